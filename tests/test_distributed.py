"""Data-parallel training and the sharded bundle build, with 2 real processes on loopback.

The collectives run over gloo between processes started by ``torch.multiprocessing`` or by
``torchrun`` itself (``python -m torch.distributed.run --standalone``), never mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer.distributed import Dist, block_range  # noqa: E402
from trainer.neighbours import exact_neighbours  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 2 processes x 1 thread on this 2-core machine.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
# Dropout off and fp32: one process and two ranks then compute the same whole-batch
# gradients up to the order of float sums. Measured: per-epoch losses agree to 2e-8
# relative over 3 epochs; the bound leaves room for other CPUs' summation orders.
LOSS_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, world: int, port: int) -> Dist:
    """What torchrun's environment gives a worker, then the trainer's own set-up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from trainer.distributed import init_from_env

    return init_from_env()


def _leave() -> None:
    """A worker's end once its checks passed, as the trainer's workers end
    (``exit_worker``): without Python's finalization, where a gloo thread still releasing
    its last tensor aborts the process ("terminate called without an active exception",
    seen in CI on a loaded machine after every check had passed)."""
    from trainer.distributed import exit_worker

    torch.distributed.destroy_process_group()
    exit_worker(0)


def _spawn(fn: Any, *args: Any) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(2, _free_port(), *args), nprocs=2, join=True)


# -- gradients: two ranks' shares == one process's whole batch ---------------------------


def _tiny_model(seed: int = 0) -> Any:
    from trainer.model import ModelConfig, SongAutoEncoder

    torch.manual_seed(seed)
    return SongAutoEncoder(ModelConfig(input_dim=300, hidden=(16, 8), dropout=0.0,
                                       negative_samples=64, precision="fp32"))


def _tiny_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=40)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.sort(rng.choice(300, n, replace=False)) for n in lengths])
    sample = rng.integers(0, 300, size=64)
    return indptr, indices, sample


def _dense_rows(model: Any, grads: Any) -> dict[str, np.ndarray]:
    """Row-sparse gradients as full D-row arrays."""
    out = {}
    for name, table in (("in_table", model.in_table), ("out_table", model.out_table),
                        ("out_bias", model.out_bias)):
        full = torch.zeros_like(table)
        for rows, grad in grads.merged(name):
            full.index_add_(0, rows, grad)
        out[name] = full.numpy()
    return out


def _reference() -> dict[str, Any]:
    from trainer.model import batch_loss, make_batch

    model = _tiny_model()
    indptr, indices, sample = _tiny_batch()
    parts = batch_loss(model, make_batch(indptr, indices), sample)
    parts.loss.backward()
    return {"loss": float(parts.loss.detach()), "rows": _dense_rows(model, parts.row_grads),
            "dense": [p.grad.numpy().copy() for p in model.dense_parameters()]}


def _grads_worker(rank: int, world: int, port: int, ref: dict[str, Any]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from trainer.distributed import all_sum, average_row_grads
    from trainer.model import LossStep, make_batch

    dist = _join(rank, world, port)
    model = _tiny_model()
    step = DistributedDataParallel(LossStep(model))
    indptr, indices, sample = _tiny_batch()
    whole = (len(indices), len(indptr) - 1)
    # The rank's rows, as Trainer.run_epoch splits a batch (uneven: 40 rows, 2 ranks
    # -> 20/20; positives differ per rank).
    mine = np.array_split(np.arange(len(indptr) - 1), world)[rank]
    lo, hi = indptr[mine[0]], indptr[mine[-1] + 1]
    batch = make_batch(indptr[mine[0] : mine[-1] + 2] - lo, indices[lo:hi])
    parts = step(batch, sample, whole)  # the same sampled columns on both ranks
    (parts.loss * world).backward()
    tables = {"in_table": model.in_table, "out_bias": model.out_bias,
              "out_table": model.out_table}
    averaged = average_row_grads(parts.row_grads, tables, dist)
    (total,) = all_sum([float(parts.loss)], dist)
    assert abs(total - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (total, ref["loss"])
    got = _dense_rows(model, averaged)
    for name, want in ref["rows"].items():
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-7, err_msg=name)
    for p, want in zip(model.dense_parameters(), ref["dense"], strict=True):
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-4, atol=1e-7)
    _leave()


def test_two_ranks_give_the_whole_batch_gradient() -> None:
    """Each rank's share of the loss, DDP's dense average and the row-sparse average of
    the tables (input rows, sampled and positive output rows, output biases) give
    exactly the single-process gradient of the whole batch."""
    _spawn(_grads_worker, _reference())


# -- the sharded bundle build: codes and neighbour tables by block range -----------------


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sharded_worker(rank: int, world: int, port: int, want_pos: np.ndarray,
                    want_sim: np.ndarray, work: str) -> None:
    from trainer.distributed import collect_rows
    from trainer.neighbours import sharded_neighbours

    dist = _join(rank, world, port)
    unit = _unit(700, 24, seed=3)
    got = sharded_neighbours(unit, 20, dist, block=64, margin=10, threads=1,
                             work_dir=Path(work), progress=False)
    if rank == 0:
        assert got is not None
        np.testing.assert_array_equal(got[0], want_pos)
        np.testing.assert_array_equal(got[1], want_sim)
    else:
        assert got is None  # rank 0 alone merges
    # All-gather of uneven ranges (11 blocks of 64 over 2 ranks), 2-D and 1-D.
    lo, hi = block_range(700, 64, rank, world)
    everywhere = collect_rows(unit[lo:hi], 700, 64, dist, to_all=True)
    np.testing.assert_array_equal(everywhere, unit)
    ids = collect_rows(np.arange(lo, hi), 700, 64, dist, to_all=True)
    np.testing.assert_array_equal(ids, np.arange(700))
    _leave()


def test_sharded_neighbour_table_equals_one_process(tmp_path: Path) -> None:
    unit = _unit(700, 24, seed=3)
    pos, sim = exact_neighbours(unit, 20, block=64, margin=10, threads=1, progress=False)
    _spawn(_sharded_worker, pos, sim, str(tmp_path / "blocks"))
    # Each rank saved its own blocks: a later one-process run reuses all of them.
    saved = sorted(p.name for p in (tmp_path / "blocks").rglob("block-*.npz"))
    assert len(saved) == 11
    again = exact_neighbours(unit, 20, block=64, margin=10, threads=1, progress=False,
                             work_dir=tmp_path / "blocks")
    np.testing.assert_array_equal(again[0], pos)


def test_block_ranges_cover_every_row_once() -> None:
    for n, block, world in [(700, 64, 2), (10, 64, 3), (4096, 1024, 4), (1, 8, 2)]:
        ranges = [block_range(n, block, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(lo % block == 0 for lo, _ in ranges)


# -- torchrun end to end ----------------------------------------------------------------


def _torchrun(args: list[str], nproc: int = 2, extra: list[str] | None = None
              ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *(extra or []), "-m", "trainer.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _log(bundle: Path) -> list[dict[str, Any]]:
    work = bundle.with_name(bundle.name + ".work")
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_match_one_process(tiny_split: Path, tmp_path: Path) -> None:
    """The loss curve of a 2-rank run equals the single-process one within LOSS_RTOL, the
    log says the world size, and the sharded export writes a complete bundle."""
    from server import bundle as bundle_files
    from trainer.train import main

    common = ["--data", str(tiny_split), "--preset", "tiny", "--epochs", "2",
              "--val-every", "2", "--dropout", "0", "--precision", "fp32", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "one"), "--no-export"]) == 0
    proc = _torchrun([*common, "--out", str(tmp_path / "two")])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0 of world size 2" in out and "rank 1 of world size 2" in out
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["epoch"] for r in two] == [1, 2]
    assert all(r["world_size"] == 2 for r in two)
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["masked_mse"] == pytest.approx(a["masked_mse"], rel=LOSS_RTOL)
        assert b["steps"] == a["steps"]
    assert two[-1]["val_score"] == pytest.approx(one[-1]["val_score"], abs=5e-3)
    manifest = bundle_files.read_manifest(tmp_path / "two")
    assert manifest.extra["n_songs"] == 3000
    assert manifest.extra["song_neighbours"]["k"] == 100
    table = np.load(tmp_path / "two" / bundle_files.NEIGHBOURS)
    assert table["rows"].shape == (manifest.extra["n_distinct_songs"], 100)
    assert not (tmp_path / "two.staging").exists()


def _rank_pid(launcher: int, local_rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun's worker with this LOCAL_RANK (its child process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (int(stat.rsplit(")", 1)[1].split()[1]) == launcher
                    and f"LOCAL_RANK={local_rank}".encode() in env):
                return int(entry)
        time.sleep(0.2)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under pid {launcher}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_killed_worker_fails_clearly_and_resume_continues(tiny_data: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "b"
    work = tmp_path / "b.work"
    # Small batches: an epoch is ~175 steps, seconds long, so the kill lands inside one.
    args = ["--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--epochs", "5",
            "--batch-size", "16", "--no-export", "--threads", "1"]
    proc = _torchrun(args)
    try:
        deadline = time.monotonic() + 300
        while not (work / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # torchrun names the dead worker; the surviving rank says what happened and what to do.
    assert "Signal 9 (SIGKILL)" in text
    assert "error: rank 0 of 2: the training group lost a worker after 1 completed epoch" \
        in text, text[-3000:]
    assert "--resume" in text and str(work / "last.pt") in text
    done = [r["epoch"] for r in _log(out)]
    assert done == [1]
    proc = _torchrun([*args, "--resume"])
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert f"resumed from {work / 'last.pt'} at epoch 1" in text
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_torchrun_restart_resumes_by_itself(tiny_data: Path, tmp_path: Path) -> None:
    """With --max-restarts, torchrun restarts the group with the same arguments (no
    --resume): the trainer sees TORCHELASTIC_RESTART_COUNT and resumes."""
    out = tmp_path / "b"
    work = tmp_path / "b.work"
    args = ["--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--epochs", "4",
            "--batch-size", "16", "--no-export", "--threads", "1"]
    proc = _torchrun(args, extra=["--max-restarts=1"])
    try:
        deadline = time.monotonic() + 300
        while not (work / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        text, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert f"resumed from {work / 'last.pt'} at epoch 1" in text
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_rank_bundle_scores_within_noise(tiny_split: Path, tmp_path: Path) -> None:
    """With dropout on (the ranks draw their own masks), the 2-rank bundle's official score
    on the validation questions differs from the single-process bundle's by less than 3
    standard errors of the paired per-question difference."""
    from trainer.dataset import load_dataset
    from trainer.evaluate import SONG_WEIGHT, TAG_WEIGHT, ndcg_per_playlist
    from trainer.recommend import load_questions, run_model
    from trainer.recommenders.registry import make_recommender
    from trainer.train import main

    common = ["--data", str(tiny_split), "--preset", "tiny", "--epochs", "4",
              "--val-every", "4", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun([*common, "--out", str(tmp_path / "two")])
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, text[-3000:]
    data = load_dataset(tiny_split)
    questions = load_questions(data, tiny_split / "val_questions.json")
    answers = json.loads((tiny_split / "val_answers.json").read_text())
    per_question = []
    for name in ("one", "two"):
        model = make_recommender("ae-quota", bundle=str(tmp_path / name))
        results, _, _ = run_model(data, questions, model, progress=False)
        song, tag = ndcg_per_playlist(answers, results)
        per_question.append(SONG_WEIGHT * song + TAG_WEIGHT * tag)
    diff = per_question[1] - per_question[0]
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(f"score one process {per_question[0].mean():.4f}, two ranks "
          f"{per_question[1].mean():.4f}, paired difference {diff.mean():+.4f} (SE {se:.4f})")
    assert per_question[0].mean() > 0.05  # both bundles learned something
    assert abs(diff.mean()) <= 3 * se + 1e-9, (per_question[0].mean(),
                                               per_question[1].mean(), se)
