"""The training command line: progress files, resume, early stopping, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainer.train import main


def _log(bundle: Path) -> list[dict[str, object]]:
    work = bundle.with_name(bundle.name + ".work")
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_resume_continues_from_last_checkpoint(tiny_split: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    common = ["--data", str(tiny_split), "--out", str(out), "--preset", "tiny",
              "--val-every", "1", "--patience", "10", "--no-export"]
    assert main([*common, "--epochs", "2"]) == 0
    assert [r["epoch"] for r in _log(out)] == [1, 2]
    assert main([*common, "--epochs", "3", "--resume"]) == 0
    records = _log(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val_score" in r and 0 <= r["val_score"] <= 1 for r in records)
    work = out.with_name("b.work")
    assert (work / "training.png").read_bytes()[:4] == b"\x89PNG"
    # The same three epochs in one go give the same losses: resuming is exact.
    again = tmp_path / "c"
    assert main(["--data", str(tiny_split), "--out", str(again), "--preset", "tiny",
                 "--val-every", "1", "--patience", "10", "--no-export", "--epochs", "3"]) == 0
    assert [r["loss"] for r in _log(again)] == [r["loss"] for r in records]


def test_early_stopping_keeps_best_epoch(tiny_split: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert main(["--data", str(tiny_split), "--out", str(out), "--preset", "tiny",
                 "--epochs", "12", "--val-every", "1", "--patience", "1", "--lr", "0.05",
                 "--no-export"]) == 0
    records = _log(out)
    scores = [r["val_score"] for r in records]
    # Stopped at the first epoch that did not beat the best so far.
    assert len(records) < 12
    assert scores[-1] <= max(scores[:-1])


def test_bad_arguments_give_one_line_errors(tiny_split: Path, tmp_path: Path) -> None:
    cases = [
        ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--data", str(tiny_split), "--out", str(tmp_path / "o"), "--aug-step", "1"],
        ["--data", str(tiny_split), "--out", str(tmp_path / "o"), "--groups", "colours"],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "trainer.train", *args, "--preset",
                               "tiny"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert "Traceback" not in proc.stderr
