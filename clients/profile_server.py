"""Where a loaded server spends its CPU: py-spy samples under the serving benchmark's load.

    python -m clients.profile_server [--bundle bundles/melon] [--rpcs similar,continue,encode]
        [--concurrency 32] [--duration 15] [--out-dir docs/profiles]

For each RPC: start the server, drive it with the benchmark's own requests (closed loop)
while ``py-spy record`` samples the server process, then fold the samples into two tables,
self time (the innermost Python frame: time inside a C extension counts for the Python
line that called it) and inclusive time per function, written to ``OUT_DIR/<rpc>.txt``
next to the raw folded stacks (``<rpc>.folded``, for flame-graph tools). py-spy slows the
sampled process a little, so throughput here is not the benchmark's: use the shares.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.bench_serving import RPCS, load_grid, start_server
from clients.benchtools import REPO, free_port, shown_command, shown_path
from clients.loadtest import LoadError, RequestShape, build_workload

PROG = "python -m clients.profile_server"


def fold(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples, self counts and inclusive counts per function from py-spy's raw output
    (``frame;frame;... count`` per line, outermost first; frames are ``fn (file:line)``)."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own, inclusive


def _function(frame: str) -> str:
    """``fn (path/to/file.py:123)`` -> ``fn (file.py)``: lines of one function merged."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"


def render(rpc: str, total: int, own: collections.Counter[str],
           inclusive: collections.Counter[str], top: int, header: str) -> str:
    lines = [header, "", f"{rpc}: {total} samples of the server's busy threads", "",
             "self (innermost Python frame):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive (the function or anything it called):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "melon")
    p.add_argument("--questions", type=Path, default=None,
                   help="questions file (default: the melon split's val_questions.json when "
                        "it exists and --bundle is the default)")
    p.add_argument("--rpcs", default=",".join(RPCS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "profiles")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print(f"{PROG}: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    questions = args.questions
    if questions is None and args.bundle == REPO / "bundles" / "melon":
        default = REPO / "data" / "melon-split" / "val_questions.json"
        questions = default if default.is_file() else None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for rpc in [r.strip() for r in args.rpcs.split(",") if r.strip()]:
            calls = build_workload(rpc, questions=questions, bundle=args.bundle, pool=2000,
                                   seed=0, shape=RequestShape(k=100))
            port = free_port()
            server = start_server(args.bundle, port, args.server_arg, 900.0)
            try:
                load_grid({"server": f"127.0.0.1:{port}"}, {rpc: calls},
                          [args.concurrency], 3.0, 1.0)
                folded = args.out_dir / f"{rpc}.folded"
                record = subprocess.Popen(
                    [spy, "record", "--pid", str(server.pid), "--rate",
                     str(args.rate), "--duration", str(int(args.duration)), "--format",
                     "raw", "--output", str(folded), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                load_grid({"server": f"127.0.0.1:{port}"}, {rpc: calls},
                          [args.concurrency], args.duration, 0.5)
                _, err = record.communicate(timeout=args.duration + 60)
                if record.returncode != 0 or not folded.exists():
                    print(f"{PROG}: py-spy failed: {err.strip()[-500:]}", file=sys.stderr)
                    return 2
            finally:
                server.stop()
            total, own, inclusive = fold(folded)
            header = (f"{shown_command(PROG, [shlex.quote(a) for a in argv])}\n(rpc {rpc}, "
                      f"concurrency {args.concurrency}, {args.duration:.0f} s, bundle "
                      f"{shown_path(args.bundle)})")
            text = render(rpc, total, own, inclusive, args.top, header)
            (args.out_dir / f"{rpc}.txt").write_text(text)
            print(text, flush=True)
    except LoadError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
