"""Data benchmark: synthetic generation and dataset loading at Melon scale (time, peak RSS).

    python -m trainer.bench_data [--out docs/BENCHMARKS.md] [--scale melon]

Each step runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clients.benchtools import REPO, machine, replace_marked, shown_command

START = "<!-- bench-data:start -->"
END = "<!-- bench-data:end -->"

_LOAD = """
import resource, sys, time
from trainer.dataset import load_dataset
start = time.perf_counter()
data = load_dataset(sys.argv[1])
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
sizes = ", ".join(f"{k} {len(v):,}" for k, v in data.playlists.items())
print(f"{seconds:.2f} {rss:.2f} {len(data.songs):,} songs, {sizes}")
"""


def _child(args: list[str]) -> tuple[float, float, str]:
    """Run a Python child; (wall seconds, its peak RSS in GB, its last stdout line)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    lines = proc.stdout.strip().splitlines() or [""]
    return seconds, rss, lines[-1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.bench_data",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file or -")
    p.add_argument("--scale", default="melon", choices=["tiny", "small", "melon"])
    args = p.parse_args(argv)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        out = Path(tmp) / "data"
        gen_s, gen_rss, summary = _child(["-m", "trainer.synth", "--scale", args.scale,
                                          "--seed", "1", "--quirks", "--out", str(out)])
        rows.append((f"`trainer.synth --scale {args.scale} --quirks`",
                     f"{gen_s:.1f} s, peak RSS {gen_rss:.2f} GB ({summary})"))
        _, _, line = _child(["-c", _LOAD, str(out)])
        load_s, load_rss, what = line.split(" ", 2)
        rows.append(("`load_dataset` (song_meta + genres + train/val/test into arrays)",
                     f"{float(load_s):.1f} s, peak RSS {float(load_rss):.2f} GB ({what})"))
        sizes = {f.name: f.stat().st_size for f in out.iterdir()}
        rows.append(("files", ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(
            sizes.items()))))
    command = shown_command("python -m trainer.bench_data", argv)
    body = (f"## Data at {args.scale} scale\n\n`{command}` on a {machine()}, "
            f"{dt.date.today()}. Targets: generation < 5 min; loading < 30 s and < 4 GB.\n\n"
            "| step | result |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")
    print(body)
    if args.out != "-":
        replace_marked(Path(args.out), body, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
