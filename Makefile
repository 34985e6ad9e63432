# songrec: every chore is one target. `make serve` and `make test` set up
# everything from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_SPLIT := data/demo-split
export HNSWLIB_NO_NATIVE := 1
# Two cores: keep BLAS/OpenMP from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2

.PHONY: install serve test test-all lint protos bench-quality bench-train bench-serving bench-load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[train,als,dev]'
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/train.json: | $(STAMP)
	$(BIN)/python -m trainer.synth --scale small --seed 1 --out $(DEMO_DATA)

$(DEMO_SPLIT)/val_questions.json: $(DEMO_DATA)/train.json
	$(BIN)/python -m trainer.split --data $(DEMO_DATA) --out $(DEMO_SPLIT)

serve: $(STAMP) $(DEMO_SPLIT)/val_questions.json
	$(BIN)/python -m trainer.bench_quality --datasets demo --out -

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy server clients

bench-quality: $(STAMP)
	$(BIN)/python -m trainer.bench_quality --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) data

bench-train: $(STAMP)
	$(BIN)/python -m trainer.bench_train --bundle-out bundles/melon --out docs/BENCHMARKS.md
