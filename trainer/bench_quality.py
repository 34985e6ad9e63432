"""Quality benchmark: every baseline model on the demo and Spotify splits, as a markdown table.

    python -m trainer.bench_quality                      # both datasets -> docs/BENCHMARKS.md
    python -m trainer.bench_quality --datasets demo --out -          # print only
    python -m trainer.bench_quality --models ae-quota --bundle bundles/demo --datasets demo

``demo`` is the synthetic ``small`` dataset (seed 1, with quirks, as ``make serve`` makes
it) split by ``trainer.split`` into ``data/demo-split``, generated when missing.
``spotify`` is the real sample in ``../shared/data/spotify-playlists``, split (seed 777)
into a temporary directory; it is skipped with a note when absent. Scores come from
:func:`trainer.evaluate.score`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clients.benchtools import REPO, machine, replace_marked, shown_command, shown_path
from server.bundle import RANKER_ONNX
from trainer.dataset import DataError, load_dataset, read_json
from trainer.evaluate import score
from trainer.recommend import load_questions, run_model
from trainer.recommenders.registry import MODELS, make_recommender, needs_bundle
from trainer.split import write_split

DEMO_DATA = REPO / "data" / "demo"
DEMO_SPLIT = REPO / "data" / "demo-split"
SPOTIFY = REPO.parent / "shared" / "data" / "spotify-playlists"
SPOTIFY_SEED = 777
DATASETS = ("demo", "spotify")
START = "<!-- bench-quality:start -->"
END = "<!-- bench-quality:end -->"
COLUMNS = ("dataset", "model", "song nDCG", "tag nDCG", "score", "fit s", "predict s")
BENCH_BUNDLES = REPO / "bundles" / "bench"

# Autoencoders trained for the table (``trainer.train`` arguments on top of the preset):
# the write-up's configuration and its ablations.
AE_VARIANTS: dict[str, list[str]] = {
    "ae": [],
    "ae-relu": ["--activation", "relu"],
    "ae-no-plain-mse": ["--loss-weights", "15,0"],
    "ae-cf-only": ["--groups", "playlists"],  # listeners only
    "ae-cb-only": ["--groups", "genres,detail_genres,artists,years"],  # catalogue only
    # The column groups without artists (the default before the learned second stage).
    "ae-no-artists": ["--groups", "playlists,tags,genres,detail_genres"],
}
# Ranker ablations: the "ae" bundle copied, its ranker retrained without one model family's
# sources and features (``trainer.rank --without``).
RANK_ABLATIONS: dict[str, str] = {"ae-rank-no-ae": "ae", "ae-rank-no-als": "als",
                                  "ae-rank-no-cf": "cf"}
# A row option that is not the model's: ask the questions without their updt_date.
UNDATED = "undated"
# Rows: (variant, model, model options, label in the table).
AE_ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    ("ae", "ae-quota", {}, "ae-quota"),
    ("ae", "ae-quota", {"metric": "dot"}, "ae-quota, dot product instead of cosine"),
    ("ae", "ae-neighbours", {}, "ae-neighbours"),
    ("ae", "ae-hybrid", {"ae_weight": 0.0}, "ae-hybrid, ae_weight 0 (neighbour CF alone)"),
    ("ae", "ae-hybrid", {"ae_weight": 0.25}, "ae-hybrid, ae_weight 0.25"),
    ("ae", "ae-hybrid", {"ae_weight": 0.5}, "ae-hybrid, ae_weight 0.5"),
    ("ae", "ae-hybrid", {"ae_weight": 1.0}, "ae-hybrid, ae_weight 1"),
    ("ae-relu", "ae-quota", {}, "ae-quota, ReLU instead of SELU"),
    ("ae-relu", "ae-neighbours", {}, "ae-neighbours, ReLU instead of SELU"),
    ("ae-no-plain-mse", "ae-quota", {}, "ae-quota, masked MSE only (no plain MSE)"),
    ("ae-no-plain-mse", "ae-neighbours", {}, "ae-neighbours, masked MSE only"),
    ("ae-cf-only", "ae-quota", {}, "ae-quota, playlist columns only (CF)"),
    ("ae-cf-only", "ae-neighbours", {}, "ae-neighbours, playlist columns only (CF)"),
    ("ae-cb-only", "ae-quota", {}, "ae-quota, metadata columns only (CB)"),
    ("ae-cb-only", "ae-neighbours", {}, "ae-neighbours, metadata columns only (CB)"),
    ("ae", "ranked", {}, "ranked (learned second stage)"),
    # Songs no training playlist holds (the seeds' nearest by code, their artists' ones):
    # what the new-song blend adds to the default strategies.
    ("ae", "ranked", {"new_songs": False}, "ranked without the new-song blend (new_songs=False)"),
    ("ae", "ae-hybrid", {"new_songs": False},
     "ae-hybrid without the new-song blend (new_songs=False)"),
    # The same questions without their updt_date, as a client that sends none asks them
    # (the ranker's date features read it; trainer.rank's undated_share).
    ("ae", "ranked", {UNDATED: True}, "ranked, questions without updt_date"),
    ("ae-rank-no-ae", "ranked", {}, "ranked without the autoencoder's sources and features"),
    ("ae-rank-no-als", "ranked", {}, "ranked without ALS"),
    ("ae-rank-no-cf", "ranked", {}, "ranked without neighbour CF"),
    ("ae-no-artists", "ae-quota", {}, "ae-quota, column groups without artists"),
    ("ae-no-artists", "ae-hybrid", {}, "ae-hybrid, column groups without artists"),
    ("ae-no-artists", "ranked", {}, "ranked, column groups without artists"),
]


@dataclass
class Report:
    """Rows of the table and the notes (dataset sizes, skips) printed under it."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _run_module(module: str, *args: str) -> None:
    """Run ``python -m module args`` from the repository root; a failure raises ValueError
    carrying the tail of its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"python -m {module} {' '.join(args)} failed: {tail}")


def prepare_demo() -> Path:
    """``data/demo-split``, generating the synthetic demo data and its split if missing."""

    if not (DEMO_SPLIT / "val_answers.json").exists():
        if not (DEMO_DATA / "train.json").exists():
            _run_module("trainer.synth", "--scale", "small", "--seed", "1", "--quirks",
                        "--out", str(DEMO_DATA))
        write_split(DEMO_DATA, DEMO_SPLIT)
    return DEMO_SPLIT


def prepare_spotify(tmp: Path) -> Path | None:
    """Split the shared Spotify sample into ``tmp``; None when the sample is absent."""

    if not (SPOTIFY / "train.json").exists():
        return None
    out = tmp / "spotify-split"
    write_split(SPOTIFY, out, seed=SPOTIFY_SEED)
    return out


def bench_dataset(name: str, split: Path, models: Sequence[str], bundle: str | None,
                  report: Report, *, progress: bool = True) -> None:
    """Fit and score each model on one split (``train.json``, ``val_questions.json``,
    ``val_answers.json``), adding a row per model and notes to ``report``."""

    data = load_dataset(split, files=["train.json"])
    questions = load_questions(data, split / "val_questions.json")
    answers = read_json(split / "val_answers.json")
    report.notes.append(f"`{name}`: {len(data.train)} training playlists, "
                        f"{len(questions)} questions, {len(data.songs)} songs.")
    for model_name in models:
        options: dict[str, Any] = {}
        if needs_bundle(model_name):
            if bundle is None:
                report.notes.append(f"`{model_name}` skipped on `{name}`: needs --bundle.")
                continue
            options["bundle"] = bundle
        try:
            model = make_recommender(model_name, **options)
        except ValueError as exc:  # e.g. implicit not installed
            report.notes.append(f"`{model_name}` skipped on `{name}`: {exc}")
            continue
        results, fit_s, predict_s = run_model(data, questions, model, progress=progress)
        scores = score(answers, results)
        report.rows.append({"dataset": name, "model": model_name,
                            "song_ndcg": scores.song_ndcg, "tag_ndcg": scores.tag_ndcg,
                            "score": scores.score, "fit_s": fit_s, "predict_s": predict_s})
        print(f"{name} {model_name}: {scores} fit {fit_s:.2f} s predict {predict_s:.2f} s",
              file=sys.stderr)


def train_variant(dataset: str, split: Path, variant: str, preset: str,
                  retrain: bool) -> tuple[Path, float]:
    """The bundle of one autoencoder variant (with its ranker), trained unless it exists
    (seconds spent). A ranker ablation is the ``ae`` bundle with its ranker retrained."""
    bundle = BENCH_BUNDLES / dataset / variant
    if (bundle / "manifest.json").exists() and (bundle / RANKER_ONNX).exists() and not retrain:
        return bundle, 0.0
    start = time.perf_counter()
    if variant in RANK_ABLATIONS:
        base, _ = train_variant(dataset, split, "ae", preset, False)
        if bundle.exists():
            shutil.rmtree(bundle)
        shutil.copytree(base, bundle)
        _run_module("trainer.rank", "--data", str(split), "--bundle", str(bundle),
                    "--without", RANK_ABLATIONS[variant])
    elif (bundle / "manifest.json").exists() and not retrain:
        _run_module("trainer.rank", "--data", str(split), "--bundle", str(bundle))
    else:
        _run_module("trainer.train", "--data", str(split), "--out", str(bundle), "--preset",
                    preset, *AE_VARIANTS[variant])
    return bundle, time.perf_counter() - start


def bench_autoencoders(name: str, split: Path, report: Report, *, preset: str,
                       retrain: bool, progress: bool,
                       variants: Sequence[str] | None = None) -> None:
    """Train every variant on one split and add the strategy/ablation rows."""

    data = load_dataset(split, files=["train.json"])
    questions = load_questions(data, split / "val_questions.json")
    answers = read_json(split / "val_answers.json")
    trained: dict[str, tuple[Path, float]] = {}
    for variant, model_name, options, label in AE_ROWS:
        if variants is not None and variant not in variants:
            continue
        if variant not in trained:
            trained[variant] = train_variant(name, split, variant, preset, retrain)
            print(f"{name}: {variant} bundle ready ({trained[variant][1]:.0f} s training)",
                  file=sys.stderr)
        bundle, train_s = trained[variant]
        asked = ([replace(q, updt_date=0) for q in questions] if options.get(UNDATED)
                 else questions)
        model = make_recommender(model_name, bundle=str(bundle),
                                 **{k: v for k, v in options.items() if k != UNDATED})
        results, fit_s, predict_s = run_model(data, asked, model, progress=progress)
        scores = score(answers, results)
        report.rows.append({"dataset": name, "model": label, "song_ndcg": scores.song_ndcg,
                            "tag_ndcg": scores.tag_ndcg, "score": scores.score,
                            "fit_s": fit_s + train_s, "predict_s": predict_s})
        trained[variant] = (bundle, 0.0)  # count training once, on the variant's first row
        print(f"{name} {label}: {scores}", file=sys.stderr)
    report.notes.append(
        f"`{name}` autoencoders: `trainer.train --preset {preset}` on the split (fit s of a "
        f"variant's first row includes its training; bundles in "
        f"`{shown_path(BENCH_BUNDLES / name)}`).")


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of benchmark rows (scores to 4 decimals, seconds to 2)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['song_ndcg']:.4f} | "
                     f"{r['tag_ndcg']:.4f} | {r['score']:.4f} | {r['fit_s']:.2f} | "
                     f"{r['predict_s']:.2f} |")
    return "\n".join(lines)


def render(report: Report, command: str) -> str:
    """The benchmark section: heading, how and where it ran, the table, the notes."""
    notes = "\n".join(f"- {n}" for n in report.notes)
    return (
        "## Recommendation quality\n\n"
        f"`{command}` on a {machine()}, {dt.date.today().isoformat()}.\n"
        "Score = 0.85 song nDCG@100 + 0.15 tag nDCG@10 over each split's validation "
        "questions; fit and predict are wall-clock seconds (predict covers every "
        "question).\n\n"
        f"{results_table(report.rows)}\n\n"
        f"{notes}\n"
        "- Reference on the Spotify sample (80/20 split, seed 777): most popular 0.055, "
        "playlist-neighbour CF 0.114.\n"
    )


def replace_section(path: Path, body: str) -> None:
    """Put ``body`` between the bench-quality markers of ``path``."""
    replace_marked(path, body, START, END)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench_quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated, from: {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every registered model "
                             "that needs no bundle)")
    parser.add_argument("--bundle", default=None,
                        help="trained bundle for models that need one (e.g. ae-quota)")
    parser.add_argument("--out", default="docs/BENCHMARKS.md",
                        help="markdown file whose bench-quality section is replaced, "
                             "or - to print only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-ae", action="store_true",
                        help="baselines only: train no autoencoder variants")
    parser.add_argument("--ae-preset", default="small", help="trainer preset for the AE rows")
    parser.add_argument("--ae-variants", default=None,
                        help="comma-separated AE bundle variants to run (default: all of "
                             f"{', '.join([*AE_VARIANTS, *RANK_ABLATIONS])})")
    parser.add_argument("--retrain", action="store_true",
                        help="retrain AE bundles even when bundles/bench already has them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shown_command("python -m trainer.bench_quality", argv)
    try:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        unknown = sorted(set(datasets) - set(DATASETS))
        if unknown or not datasets:
            raise ValueError(f"unknown dataset {', '.join(unknown) or '(none)'}; "
                             f"known: {', '.join(DATASETS)}")
        if args.models:
            models = [m.strip() for m in args.models.split(",") if m.strip()]
            for m in models:
                if m not in MODELS:
                    raise ValueError(f"unknown model {m!r}; known models: "
                                     f"{', '.join(sorted(MODELS))}")
        else:
            models = [m for m in MODELS if not needs_bundle(m)]
        variants = None
        if args.ae_variants:
            variants = [v.strip() for v in args.ae_variants.split(",") if v.strip()]
            known = {*AE_VARIANTS, *RANK_ABLATIONS}
            if set(variants) - known:
                raise ValueError(f"unknown AE variant {', '.join(sorted(set(variants) - known))}"
                                 f"; known: {', '.join(sorted(known))}")
        report = Report()
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
            for name in datasets:
                split = prepare_demo() if name == "demo" else prepare_spotify(Path(tmp))
                if split is None:
                    report.notes.append(f"`{name}` skipped: ../shared/data/{SPOTIFY.name} not "
                                        f"found.")
                    continue
                bench_dataset(name, split, models, args.bundle, report,
                              progress=not args.no_progress)
                if not args.no_ae:
                    bench_autoencoders(name, split, report, preset=args.ae_preset,
                                       retrain=args.retrain, progress=not args.no_progress,
                                       variants=variants)
        body = render(report, command)
        if args.out != "-":
            replace_section(Path(args.out), body)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    print(body)
    if args.out != "-":
        print(f"wrote the bench-quality section of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
