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

.PHONY: install sidecars serve test test-all lint protos bench-quality bench-rank bench-train bench-serving bench-heavy bench-load bench-data bench-replicas demo-replicas soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[train,als,dev]'
	touch $(STAMP)

install: $(STAMP)

# PostgreSQL and nginx from the Debian packages: the replica tests, benchmarks and demo
# start their own throwaway servers of both (clients/sidecars.py). Needs root (CI is root).
sidecars:
	@if command -v nginx >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgresql and nginx: installed"; \
	else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql nginx; \
	fi

$(DEMO_DATA)/train.json: | $(STAMP)
	$(BIN)/python -m trainer.synth --scale small --seed 1 --quirks --out $(DEMO_DATA)

$(DEMO_SPLIT)/val_questions.json: $(DEMO_DATA)/train.json
	$(BIN)/python -m trainer.split --data $(DEMO_DATA) --out $(DEMO_SPLIT)

DEMO_BUNDLE := bundles/demo

# The demo bundle: synthetic `small` data (with the real files' dirt: --quirks), trained
# with the `small` preset (a few minutes).
$(DEMO_BUNDLE)/manifest.json: $(DEMO_SPLIT)/val_questions.json
	$(BIN)/python -m trainer.train --data $(DEMO_SPLIT) --out $(DEMO_BUNDLE) --preset small

serve: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	@echo "songrec: serving $(DEMO_BUNDLE) on localhost:50051 (Ctrl-C to stop)."
	@echo "  try:  $(BIN)/python -m clients similar 1 -k 10"
	@echo "        $(BIN)/python -m clients continue --songs 1,2,3"
	@echo "        $(BIN)/python -m clients info"
	$(BIN)/python -m server --bundle $(DEMO_BUNDLE) --port 50051 --data-dir data/serve

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy server clients
	$(BIN)/lint-imports

bench-quality: $(STAMP)
	$(BIN)/python -m trainer.bench_quality --out docs/BENCHMARKS.md

# The learned second stage on the demo bundle: candidate recall per source, CPU per
# question of ranked against ae-hybrid.
bench-rank: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m trainer.bench_rank --bundle $(DEMO_BUNDLE) --data $(DEMO_SPLIT) --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) data

bench-train: $(STAMP)
	$(BIN)/python -m trainer.bench_train --bundle-out bundles/melon --out docs/BENCHMARKS.md

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/songrec/v1/songrec.proto

bench-serving: $(STAMP)
	$(BIN)/python -m clients.bench_serving

# One-song probes while the heaviest SimilarSongsBatch calls run, against a fresh server on
# the demo bundle; results into docs/BENCHMARKS.md (about a minute).
bench-heavy: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m clients.bench_heavy --bundle $(DEMO_BUNDLE) --out docs/BENCHMARKS.md

# A load test against a running `make serve` (another terminal).
bench-load: $(STAMP) $(DEMO_SPLIT)/val_questions.json
	$(BIN)/python -m clients.loadtest --rpc mixed --questions $(DEMO_SPLIT)/val_questions.json --concurrency 16 --duration 10

bench-data: $(STAMP)
	$(BIN)/python -m trainer.bench_data --out docs/BENCHMARKS.md

SOAK_SECONDS ?= 120

# Two replicas on one SQLite song store behind nginx, all on loopback (Ctrl-C stops all);
# REPLICA_STORE=postgres uses a throwaway PostgreSQL server instead.
demo-replicas: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m clients.replicas demo --bundle $(DEMO_BUNDLE) --port 50051 --store $(or $(REPLICA_STORE),sqlite)

# AddSongs throughput and propagation lag (SQLite, PostgreSQL), calls/s through nginx to
# two replicas against direct to one, RSS per replica: into docs/BENCHMARKS.md.
bench-replicas: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m clients.replicas bench --bundle $(DEMO_BUNDLE) --out docs/BENCHMARKS.md

# Mixed load at concurrency 64 against a fresh loopback server on the demo bundle, with
# AddSongs throughout and one ReloadModel half-way; results into docs/BENCHMARKS.md.
soak: $(STAMP) $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m clients.soak --bundle $(DEMO_BUNDLE) --duration $(SOAK_SECONDS) --concurrency 64 --out docs/BENCHMARKS.md
