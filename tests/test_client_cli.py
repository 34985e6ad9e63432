"""``python -m clients``: every subcommand's table and ``--json`` output against a real
server on port 0 with the tiny bundle, exit statuses and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.__main__ import main, table, width
from server.config import ServerConfig
from server.testing import ServerThread

ADMIN = "cli-test-admin"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, workers=2,
                          data_dir=tmp_path_factory.mktemp("cli-wal"), verify=False)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def meta(tiny_split: Path) -> dict[int, dict[str, Any]]:
    return {m["id"]: m for m in json.loads((tiny_split / "song_meta.json").read_text())}


@pytest.fixture(scope="module")
def seeds(tiny_split: Path) -> list[int]:
    questions = json.loads((tiny_split / "val_questions.json").read_text())
    return list(next(q for q in questions if len(q["songs"]) >= 3)["songs"][:3])


def cli(capsys: pytest.CaptureFixture[str], live: ServerThread, *args: str
        ) -> tuple[int, str, str]:
    status = main([*args, "--target", live.target])
    out, err = capsys.readouterr()
    return status, out, err


def rows_of(text: str) -> list[list[str]]:
    """The data rows of the first table in ``text`` (after its dashed rule)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("----"))
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_similar_table_and_json(capsys: pytest.CaptureFixture[str], live: ServerThread,
                                seeds: list[int], meta: dict[int, dict[str, Any]]) -> None:
    status, out, err = cli(capsys, live, "similar", str(seeds[0]), "-k", "4")
    assert status == 0 and err == ""
    assert out.startswith(f"4 songs similar to {seeds[0]} (model ")
    rows = rows_of(out)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    for row in rows:  # rank, id, similarity, then the name from the bundle
        song = int(row[1])
        assert song != seeds[0] and -1.001 <= float(row[2]) <= 1.001
        assert " ".join(row[3:]).startswith(meta[song]["song_name"].split()[0])
    status, out, _ = cli(capsys, live, "similar", str(seeds[0]), "-k", "4", "--json")
    data = json.loads(out)
    assert status == 0 and data["song_id"] == seeds[0]
    assert [n["song_id"] for n in data["neighbours"]] == [int(r[1]) for r in rows]
    assert all(n["name"] == meta[n["song_id"]]["song_name"] for n in data["neighbours"])


def test_continue(capsys: pytest.CaptureFixture[str], live: ServerThread,
                  seeds: list[int]) -> None:
    ids = ",".join(map(str, [*seeds, 987654321]))
    status, out, _ = cli(capsys, live, "continue", "--songs", ids, "--tags", "봄, 드라이브xyz",
                         "--title", "봄 노래", "-n", "6", "--n-tags", "3")
    assert status == 0
    assert out.startswith("6 songs and 3 tags (strategy ")
    assert "unknown seed songs (skipped): 987654321" in out
    assert "드라이브xyz" in out.split("unknown tags (skipped):")[1].splitlines()[0]
    assert len(rows_of(out)) == 6
    status, out, _ = cli(capsys, live, "continue", "--songs", ids, "--json",
                         "--strategy", "ae-quota")
    data = json.loads(out)
    assert len(data["songs"]) == 100 and len(data["tags"]) == 10
    assert data["strategy"] == "ae-quota" and data["unknown_seed_ids"] == [987654321]
    assert not {s["song_id"] for s in data["songs"]} & set(seeds)
    assert {s["reason"]["kind"] for s in data["songs"]} <= {"seed_neighbour", "popular"}


def test_encode(capsys: pytest.CaptureFixture[str], live: ServerThread, seeds: list[int],
                meta: dict[int, dict[str, Any]]) -> None:
    record = meta[seeds[0]]
    args = ["encode", "--genres", ",".join(record["song_gn_gnr_basket"]),
            "--detail-genres", ",".join(record["song_gn_dtl_gnr_basket"]),
            "--artists", ",".join(map(str, record["artist_id_basket"])),
            "--issue-date", record["issue_date"], "-k", "3"]
    status, out, _ = cli(capsys, live, *args)
    assert status == 0 and out.startswith("code (")
    assert len(rows_of(out)) == 3
    status, out, _ = cli(capsys, live, *args, "--json")
    data = json.loads(out)
    info = json.loads(cli(capsys, live, "info", "--json")[1])
    assert len(data["code"]) == info["code_dim"] and data["known_columns"] > 0
    status, _, err = cli(capsys, live, "encode", "--genres", "rock")
    assert status == 1 and "INVALID_ARGUMENT" in err and "song.genres[0]" in err


def test_info_and_health(capsys: pytest.CaptureFixture[str], live: ServerThread,
                         tiny_bundle: Path) -> None:
    version = json.loads((tiny_bundle / "manifest.json").read_text())["model_version"]
    status, out, _ = cli(capsys, live, "info")
    assert status == 0 and ["model_version", version] in rows_of(out)
    data = json.loads(cli(capsys, live, "info", "--json")[1])
    assert data["loaded"] is True and data["model_version"] == version
    status, out, _ = cli(capsys, live, "health")
    assert status == 0
    assert rows_of(out) == [["(server)", "SERVING"], ["songrec.v1.Recommender", "SERVING"],
                            ["songrec.v1.Admin", "SERVING"]]
    status, out, err = cli(capsys, live, "health", "--service", "nope.Nope")
    assert status == 1 and "NOT_FOUND" in err


def test_add_songs(capsys: pytest.CaptureFixture[str], live: ServerThread,
                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                   meta: dict[int, dict[str, Any]]) -> None:
    template = next(iter(meta.values()))
    songs = [dict(template, id=7_000_000 + i, song_name=f"new {i}") for i in range(3)]
    file = tmp_path / "new.json"
    file.write_text(json.dumps(songs, ensure_ascii=False), encoding="utf-8")
    status, _, err = cli(capsys, live, "add-songs", str(file))
    assert status == 1 and "PERMISSION_DENIED" not in err and "UNAUTHENTICATED" in err
    monkeypatch.setenv("SONGREC_ADMIN_TOKEN", ADMIN)
    status, out, _ = cli(capsys, live, "add-songs", str(file))
    assert status == 0 and out.startswith("added 3 songs, 0 already served")
    status, out, _ = cli(capsys, live, "add-songs", str(file), "--json")
    data = json.loads(out)
    assert data["added_song_ids"] == [] and data["existing_song_ids"] == [7_000_000,
                                                                          7_000_001,
                                                                          7_000_002]
    status, out, _ = cli(capsys, live, "similar", "7000001", "-k", "2", "--json")
    assert status == 0 and len(json.loads(out)["neighbours"]) == 2


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], live: ServerThread,
                           tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "song_gn_gnr_basket": "GN0100"}]))
    status, out, err = cli(capsys, live, "add-songs", str(bad))
    assert status == 2 and out == ""
    assert err.strip() == (f"python -m clients add-songs: {bad}: record 0 (id 1): "
                           f"song_gn_gnr_basket: 'GN0100' is not a list of strings")
    status, _, err = cli(capsys, live, "add-songs", str(tmp_path / "missing.json"))
    assert status == 2 and "unreadable" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["continue", "--songs", "1,x"])
    assert exit_.value.code == 2
    assert "not a comma-separated list of integers" in capsys.readouterr().err


def test_server_errors_exit_1(capsys: pytest.CaptureFixture[str], live: ServerThread) -> None:
    status, out, err = cli(capsys, live, "similar", "987654321")
    assert status == 1 and out == ""
    assert err.startswith("python -m clients similar: SimilarSongs: NOT_FOUND: song_id: "
                          "987654321")
    assert len(err.splitlines()) == 1
    status = main(["info", "--target", "127.0.0.1:1", "--retries", "0", "--deadline", "2"])
    assert status == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_tables_measure_wide_characters() -> None:
    assert width("봄노래") == 6 and width("ab") == 2
    text = table(["name", "n"], [("봄노래", 1), ("abc", 22)], right=[False, True])
    lines = text.splitlines()
    assert [width(line) for line in lines[:2]] == [width(lines[1])] * 2
    assert lines[2] == "봄노래   1" and lines[3] == "abc     22"


def test_module_entry_point(live: ServerThread) -> None:
    env = {**os.environ, "SONGREC_TARGET": live.target, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "clients", "info", "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["loaded"] is True
