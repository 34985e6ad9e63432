"""A minimal grpc.aio server answering songrec's method paths with canned responses of the
real sizes: Python gRPC's own ceiling on this machine, for the serving benchmark.

    python -m clients.echo_server --port 50052 [--responses DIR] [--code-dim 256]

It reads each request's bytes without parsing them and answers with fixed bytes: the
``<Method>.bin`` files in ``--responses`` (e.g. real answers captured from a server), else
synthetic answers shaped like the real ones (SimilarSongs: 100 neighbours;
ContinuePlaylist: 100 songs with reasons and 10 tags; EncodeSong: ``--code-dim`` floats
and 10 neighbours; GetModelInfo: an empty ModelInfo). No interceptor, no validation, no
model: whatever throughput it reaches, the real server cannot exceed. It prints
``listening on HOST:PORT`` on stdout once ready, so ``--port 0`` can be used.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from protos.songrec.v1 import songrec_pb2 as pb2

PROG = "python -m clients.echo_server"
SERVICE = "songrec.v1.Recommender"
METHOD_NAMES = ("SimilarSongs", "ContinuePlaylist", "EncodeSong", "SimilarSongsBatch",
                "GetModelInfo")


def synthetic_responses(code_dim: int = 256, k: int = 100, n_songs: int = 100,
                        n_tags: int = 10, encode_k: int = 10) -> dict[str, bytes]:
    """Serialized responses with the counts and value ranges of real answers: Melon-like
    six-digit song ids, playlist-neighbour reasons, Korean tags."""
    version = "20260101-0123456789abcdef-e1"
    similar = pb2.SimilarSongsResponse(song_id=123456, model_version=version)
    for i in range(k):
        similar.neighbours.add(song_id=600000 + 37 * i, similarity=0.9 - i * 1e-3)
    cont = pb2.ContinuePlaylistResponse(strategy="ae-neighbours", model_version=version)
    for i in range(n_songs):
        reason = pb2.Reason(kind=pb2.Reason.PLAYLIST_NEIGHBOUR, playlist_id=100000 + i)
        cont.songs.add(song_id=500000 + 41 * i, score=3.0 - i * 1e-2, reason=reason)
    for i in range(n_tags):
        cont.tags.add(tag=f"드라이브{i}", score=1.0 - i * 0.05)
    encoded = pb2.EncodeSongResponse(code=[0.01 * (i % 97) for i in range(code_dim)],
                                     known_columns=3, model_version=version)
    for i in range(encode_k):
        encoded.neighbours.add(song_id=400000 + 13 * i, similarity=0.8 - i * 1e-3)
    batch = pb2.SimilarSongsBatchResponse(results=[similar], model_version=version)
    return {"SimilarSongs": similar.SerializeToString(),
            "ContinuePlaylist": cont.SerializeToString(),
            "EncodeSong": encoded.SerializeToString(),
            "SimilarSongsBatch": batch.SerializeToString(),
            "GetModelInfo": pb2.ModelInfo().SerializeToString()}


def read_responses(directory: Path) -> dict[str, bytes]:
    """``<Method>.bin`` files of ``directory`` (only the methods present)."""
    out = {}
    for name in METHOD_NAMES:
        path = directory / f"{name}.bin"
        if path.is_file():
            out[name] = path.read_bytes()
    if not out:
        raise ValueError(f"--responses {directory}: no <Method>.bin file "
                         f"({', '.join(METHOD_NAMES)})")
    return out


class EchoHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers ``/songrec.v1.Recommender/<Method>`` with the method's canned bytes; the
    request is taken as bytes (no deserializer) and ignored."""

    def __init__(self, responses: Mapping[str, bytes]) -> None:
        self._handlers: dict[str, Any] = {}
        for name, payload in responses.items():
            self._handlers[f"/{SERVICE}/{name}"] = grpc.unary_unary_rpc_method_handler(
                self._answer(payload))

    @staticmethod
    def _answer(payload: bytes) -> Any:
        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return payload

        return behaviour

    def service(self, handler_call_details: Any) -> Any:
        return self._handlers.get(handler_call_details.method)


async def start_echo(responses: Mapping[str, bytes], host: str = "127.0.0.1",
                     port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start an echo server on the running loop; returns it and its bound port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((EchoHandler(responses),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    await server.start()
    return server, bound


async def serve(responses: Mapping[str, bytes], host: str, port: int) -> None:
    """Run an echo server until SIGTERM or SIGINT, announcing its port on stdout."""
    server, bound = await start_echo(responses, host, port)
    print(f"listening on {host}:{bound}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; 2 when the responses or the port are unusable."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052, help="0 picks a free port")
    p.add_argument("--responses", type=Path, default=None,
                   help="directory of <Method>.bin serialized responses to send")
    p.add_argument("--code-dim", type=int, default=256,
                   help="floats in the synthetic EncodeSong answer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        responses = synthetic_responses(args.code_dim)
        if args.responses is not None:
            responses.update(read_responses(args.responses))
        asyncio.run(serve(responses, args.host, args.port))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
