"""The refactoring check records a served bundle's answers and finds any that changed."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.check_answers import main


def test_check_answers_records_and_compares(tiny_bundle: Path, tiny_split: Path,
                                            tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    record = tmp_path / "answers.json"
    args = ["--bundle", str(tiny_bundle), "--questions", str(tiny_split / "val_questions.json"),
            "--n", "6"]
    assert main([*args, "--out", str(record)]) == 0
    answers = json.loads(record.read_text())
    kinds = {key.split("/")[0] for key in answers}
    assert {"continue", "similar", "batch"} <= kinds
    assert not any(value.startswith("error") for value in answers.values())
    assert main([*args, "--against", str(record)]) == 0
    assert "0 differ" in capsys.readouterr().out
    key = next(k for k in answers if k.startswith("continue/"))
    answers[key] = answers[key][:-2]  # one answer changed by one byte
    record.write_text(json.dumps(answers))
    assert main([*args, "--against", str(record)]) == 1
    captured = capsys.readouterr()
    assert "1 differ" in captured.out and key in captured.err
