"""Records a served bundle's answers to a set of questions, or checks them against a record.

    python -m trainer.check_answers --bundle bundles/demo \\
        --questions data/demo-split/val_questions.json --n 300 --out answers.json
    python -m trainer.check_answers ... --against answers.json

A real server on a free loopback port answers over gRPC: ``ContinuePlaylist`` for every
question with every strategy (with and without names, dropping future songs or not),
``SimilarSongs`` and ``SimilarSongsBatch`` for the questions' songs (with exclusions),
``EncodeSong`` for a few songs' metadata. Each response is stored as its canonical
serialization (deterministic protobuf bytes, hex), so a refactoring of the serving code
can show that it changed no answer, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ServerConfig
from server.testing import ServerThread
from trainer.dataset import read_json


def requests(questions: list[dict[str, Any]], songs: dict[int, dict[str, Any]],
             strategies: list[str]) -> Iterator[tuple[str, str, Any]]:
    """(key, method, request) for every call the check makes, in a fixed order."""
    for i, q in enumerate(questions):
        for strategy in strategies:
            yield (f"continue/{i}/{strategy}", "ContinuePlaylist", pb2.ContinuePlaylistRequest(
                seed_song_ids=q.get("songs", []), tags=q.get("tags", []),
                title=q.get("plylst_title", ""), updt_date=q.get("updt_date", ""),
                n_songs=100, n_tags=10, strategy=strategy, drop_future=i % 2 == 1,
                include_names=i % 3 == 0))
        seeds = list(q.get("songs", []))
        if seeds:
            yield (f"similar/{i}", "SimilarSongs", pb2.SimilarSongsRequest(
                song_id=seeds[0], k=10 + i % 50, exclude_song_ids=seeds[1:3],
                include_names=i % 4 == 0))
            yield (f"batch/{i}", "SimilarSongsBatch", pb2.SimilarSongsBatchRequest(
                song_ids=seeds[:5] + [987_654_321], k=20, exclude_song_ids=seeds[5:7],
                include_names=i % 5 == 0))
            meta = songs.get(seeds[0])
            if meta is not None and i % 10 == 0:
                yield (f"encode/{i}", "EncodeSong", pb2.EncodeSongRequest(song=pb2.SongMetadata(
                    genres=meta.get("song_gn_gnr_basket", []),
                    detail_genres=meta.get("song_gn_dtl_gnr_basket", []),
                    artist_ids=meta.get("artist_id_basket", []),
                    issue_date=str(meta.get("issue_date", ""))), k=10))


def record(bundle: Path, questions: list[dict[str, Any]], songs: dict[int, dict[str, Any]]
           ) -> dict[str, str]:
    """Every answer, keyed, as hex of its deterministic serialization (or the error)."""
    out: dict[str, str] = {}
    with ServerThread(ServerConfig(bundle=bundle, port=0, workers=2)) as server:
        with server.channel() as channel:
            stub = pb2_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            info = stub.GetModelInfo(pb2.GetModelInfoRequest())
            for key, method, request in requests(questions, songs, list(info.strategies)):
                try:
                    response = getattr(stub, method)(request, timeout=60)
                    out[key] = response.SerializeToString(deterministic=True).hex()
                except grpc.RpcError as exc:
                    out[key] = f"error {exc.code().name}: {exc.details()}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.check_answers",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--n", type=int, default=300, help="first N questions")
    p.add_argument("--out", type=Path, help="write the answers here (JSON)")
    p.add_argument("--against", type=Path, help="compare with answers written before")
    args = p.parse_args(argv)
    questions = read_json(args.questions)[: args.n]
    meta_path = args.questions.parent / "song_meta.json"
    songs = ({int(s["id"]): s for s in read_json(meta_path)} if meta_path.exists() else {})
    answers = record(args.bundle, questions, songs)
    digest = hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()[:16]
    print(f"{len(answers)} answers to {len(questions)} questions, digest {digest}")
    if args.out is not None:
        args.out.write_text(json.dumps(answers, sort_keys=True, indent=0) + "\n")
    if args.against is None:
        return 0
    before = json.loads(args.against.read_text())
    differ = sorted(k for k in before.keys() | answers.keys()
                    if before.get(k) != answers.get(k))
    for key in differ[:20]:
        print(f"differs: {key}", file=sys.stderr)
    print(f"{len(before)} recorded, {len(answers)} now, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
