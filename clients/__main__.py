"""``python -m clients``: call a songrec server from the command line.

    python -m clients similar 123 -k 20
    python -m clients continue --songs 1,2,3 --tags 봄,드라이브 --title "봄 드라이브"
    python -m clients encode --genres GN0100 --detail-genres GN0101,GN0105 --artists 123 \\
        --issue-date 20190301
    python -m clients add-songs new_songs.json        # a JSON list in song_meta.json's format
    python -m clients reload [BUNDLE_DIR]
    python -m clients info
    python -m clients health

Every subcommand takes ``--target`` (``SONGREC_TARGET``, default localhost:50051),
``--token`` (``SONGREC_TOKEN``; ``add-songs`` and ``reload`` fall back to
``SONGREC_ADMIN_TOKEN``), ``--deadline`` seconds and ``--json`` after its name. Output is
a human-readable table unless ``--json``. Exit status: 0 success, 1 the server answered
with an error (one line on stderr: method, status code, message), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from clients.client import (
    ADMIN_SERVICE,
    NO_RETRY,
    RECOMMENDER_SERVICE,
    AddedSongs,
    ClientError,
    Continuation,
    Encoded,
    ModelInfo,
    Neighbour,
    NewSong,
    Reloaded,
    RetryPolicy,
    Similar,
    SongMetadata,
    SongRecClient,
)

PROG = "python -m clients"
ADMIN_TOKEN_ENV = "SONGREC_ADMIN_TOKEN"
ADD_BATCH = 1000  # the server's limit of songs per AddSongs call


# ---------------------------------------------------------------- argument types


def int_list(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (blanks ignored)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None


def str_list(text: str) -> list[str]:
    """"봄, 드라이브" -> ["봄", "드라이브"] (surrounding blanks stripped, empties dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


# ---------------------------------------------------------------- tables


def width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide characters (Hangul) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def clip(text: str, most: int) -> str:
    if width(text) <= most:
        return text
    out, used = [], 0
    for c in text:
        w = width(c)
        if used + w > most - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]],
          right: Sequence[bool] | None = None, max_width: int = 40) -> str:
    """A plain-text table; numbers right-aligned (``right`` per column), long text cut."""
    cells = [[clip(str(v), max_width) for v in row] for row in rows]
    right = right or [False] * len(headers)
    widths = [max([width(h)] + [width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = []
        for value, w, r in zip(values, widths, right, strict=True):
            pad = " " * (w - width(value))
            parts.append(pad + value if r else value + pad)
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])]
                     + [line(r) for r in cells])


def neighbour_table(neighbours: Sequence[Neighbour]) -> str:
    return table(["rank", "song_id", "similarity", "name", "artists"],
                 [(i, n.song_id, f"{n.similarity:.4f}", n.name, n.artists)
                  for i, n in enumerate(neighbours, 1)],
                 right=[True, True, True, False, False])


def show_similar(result: Similar) -> str:
    return (f"{len(result.neighbours)} songs similar to {result.song_id} "
            f"(model {result.model_version})\n\n{neighbour_table(result.neighbours)}")


def _reason(kind: str, source: object) -> str:
    return kind if source is None else f"{kind} {source}"


def show_continuation(result: Continuation) -> str:
    parts = [f"{len(result.songs)} songs and {len(result.tags)} tags "
             f"(strategy {result.strategy}, model {result.model_version})"]
    if result.unknown_seed_ids:
        parts.append("unknown seed songs (skipped): "
                     + ", ".join(map(str, result.unknown_seed_ids)))
    if result.unknown_tags:
        parts.append("unknown tags (skipped): " + ", ".join(result.unknown_tags))
    parts.append(table(["rank", "song_id", "score", "reason", "name", "artists"],
                       [(i, s.song_id, f"{s.score:.4f}",
                         _reason(s.reason.kind, s.reason.source), s.name, s.artists)
                        for i, s in enumerate(result.songs, 1)],
                       right=[True, True, True, False, False, False]))
    if result.tags:
        parts.append(table(["rank", "tag", "score"],
                           [(i, t.tag, f"{t.score:.4f}") for i, t in enumerate(result.tags, 1)],
                           right=[True, False, True]))
    return "\n\n".join(parts)


def show_encoded(result: Encoded) -> str:
    head = ", ".join(f"{x:.4f}" for x in result.code[:8])
    more = ", ..." if len(result.code) > 8 else ""
    text = (f"code ({len(result.code)} floats, {result.known_columns} metadata values known "
            f"to model {result.model_version}): [{head}{more}]")
    if result.neighbours:
        text += f"\n\n{neighbour_table(result.neighbours)}"
    return text


def show_added(result: AddedSongs) -> str:
    lines = [f"added {len(result.added_song_ids)} songs, "
             f"{len(result.existing_song_ids)} already served; the index holds "
             f"{result.indexed_songs} songs (model {result.model_version})"]
    if result.added_song_ids:
        lines.append("added: " + ", ".join(map(str, result.added_song_ids)))
    if result.existing_song_ids:
        lines.append("unchanged: " + ", ".join(map(str, result.existing_song_ids)))
    return "\n".join(lines)


def show_info(info: ModelInfo) -> str:
    if not info.loaded:
        return ("no model loaded (the server is NOT_SERVING until Admin.ReloadModel); "
                f"strategies: {', '.join(info.strategies)}")

    def index(i: Any) -> str:
        return (f"{i.space}, dim {i.dim}, M {i.m}, ef_construction {i.ef_construction}, "
                f"ef {i.ef}, {i.count} items")

    rows = [("model_version", info.model_version), ("created", info.created),
            ("data_fingerprint", info.data_fingerprint), ("code_dim", info.code_dim),
            ("input_dim", info.input_dim),
            ("column_groups", ", ".join(f"{k} {v}" for k, v in info.column_groups.items())),
            ("songs", f"{info.indexed_songs} indexed = {info.bundle_songs} in the bundle "
                      f"+ {info.added_songs} added"),
            ("playlists", info.playlists), ("tags", info.tags),
            ("strategies", ", ".join(info.strategies)),
            ("default_strategy", info.default_strategy),
            ("song_index", index(info.song_index)),
            ("playlist_index", index(info.playlist_index))]
    return table(["field", "value"], rows, max_width=120)


def show_reloaded(result: Reloaded) -> str:
    before = result.previous.model_version if result.previous.loaded else "(none)"
    return (f"model {before} -> {result.current.model_version} in {result.seconds:.2f} s; "
            f"{result.replayed_songs} logged songs re-added; "
            f"{result.current.indexed_songs} songs indexed")


# ---------------------------------------------------------------- commands


def load_new_songs(path: Path) -> list[NewSong]:
    """A JSON list of songs in ``song_meta.json``'s format; ``ValueError`` names the file,
    the record and the field when one is malformed."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of song records")
    songs = []
    for pos, record in enumerate(raw):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {pos}: not a JSON object")
        try:
            songs.append(NewSong.from_song_meta(record))
        except ValueError as exc:
            raise ValueError(f"{path}: record {pos} (id {record.get('id')!r}): {exc}") from None
    return songs


def cmd_similar(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = client.similar(args.song_id, args.k, exclude=args.exclude or (),
                            include_names=not args.no_names)
    return result, show_similar(result)


def cmd_continue(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = client.continue_playlist(args.songs or (), args.tags or (), args.title,
                                      args.date, n_songs=args.n_songs, n_tags=args.n_tags,
                                      strategy=args.strategy, drop_future=args.drop_future,
                                      include_names=not args.no_names)
    return result, show_continuation(result)


def cmd_encode(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    song = SongMetadata(genres=tuple(args.genres or ()),
                        detail_genres=tuple(args.detail_genres or ()),
                        artist_ids=tuple(args.artists or ()), issue_date=args.issue_date,
                        playlist_ids=tuple(args.playlists or ()), tags=tuple(args.tags or ()))
    result = client.encode(song, args.k, include_names=not args.no_names)
    return result, show_encoded(result)


def cmd_add_songs(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    songs = load_new_songs(args.file)
    added: list[int] = []
    existing: list[int] = []
    result = None
    for start in range(0, len(songs), ADD_BATCH):
        result = client.add_songs(songs[start : start + ADD_BATCH])
        added.extend(result.added_song_ids)
        existing.extend(result.existing_song_ids)
    assert result is not None  # load_new_songs refuses an empty list
    total = AddedSongs(tuple(added), tuple(existing), result.indexed_songs,
                       result.model_version)
    return total, show_added(total)


def cmd_reload(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = client.reload_model(args.bundle, skip_verify=args.skip_verify)
    return result, show_reloaded(result)


def cmd_info(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    info = client.model_info()
    return info, show_info(info)


def cmd_health(client: SongRecClient, args: argparse.Namespace) -> tuple[Any, str]:
    services = [args.service] if args.service is not None else [
        "", RECOMMENDER_SERVICE, ADMIN_SERVICE]
    status = {service: client.health(service) for service in services}
    text = table(["service", "status"], [(s or "(server)", v) for s, v in status.items()])
    return {"target": client.target, "status": status}, text


# ---------------------------------------------------------------- parser and main


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--target", default=None,
                       help="host:port, dns:///host:port or host1:port,host2:port (several "
                            "replicas, round_robin; default: SONGREC_TARGET or "
                            "localhost:50051)")
    group.add_argument("--token", default=None,
                       help="bearer token (default: SONGREC_TOKEN; add-songs and reload "
                            "fall back to SONGREC_ADMIN_TOKEN)")
    group.add_argument("--deadline", type=positive_float, default=10.0,
                       help="seconds for the call, retries included (default 10)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries of UNAVAILABLE, with backoff (default 3; 0: none)")
    group.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    group.add_argument("--ca-cert", type=Path, default=None,
                       help="PEM file of roots to trust (implies --tls)")
    group.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., tuple[Any, str]], text: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    def names(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-names", action="store_true",
                       help="do not ask the server for song names and artists")

    p = add("similar", cmd_similar, "songs nearest to a known song")
    p.add_argument("song_id", type=int)
    p.add_argument("-k", type=int, default=None, help="how many (server default 10)")
    p.add_argument("--exclude", type=int_list, default=None, metavar="ID,ID",
                   help="song ids never to return")
    names(p)

    p = add("continue", cmd_continue, "continue a playlist from seed songs, tags and title")
    p.add_argument("--songs", type=int_list, default=None, metavar="ID,ID",
                   help="seed song ids")
    p.add_argument("--tags", type=str_list, default=None, metavar="TAG,TAG")
    p.add_argument("--title", default="")
    p.add_argument("--date", default="", metavar="YYYY-MM-DD",
                   help="the playlist's update date (Melon's updt_date)")
    p.add_argument("-n", "--n-songs", type=int, default=None,
                   help="songs to return (server default 100)")
    p.add_argument("--n-tags", type=int, default=None, help="tags to return (default 10)")
    p.add_argument("--strategy", default="", help="default: the server's default strategy")
    p.add_argument("--drop-future", action="store_true",
                   help="skip songs issued after --date")
    names(p)

    p = add("encode", cmd_encode, "the code and nearest songs of a song not in the index")
    p.add_argument("--genres", type=str_list, default=None, metavar="GN0100,...",
                   help="major genre codes (song_gn_gnr_basket)")
    p.add_argument("--detail-genres", type=str_list, default=None, metavar="GN0101,...",
                   help="detailed genre codes (song_gn_dtl_gnr_basket)")
    p.add_argument("--artists", type=int_list, default=None, metavar="ID,ID",
                   help="artist ids (artist_id_basket)")
    p.add_argument("--issue-date", default="", metavar="YYYYMMDD")
    p.add_argument("--playlists", type=int_list, default=None, metavar="ID,ID",
                   help="training playlists the song is known to be in")
    p.add_argument("--tags", type=str_list, default=None, metavar="TAG,TAG",
                   help="tags of playlists the song is in")
    p.add_argument("-k", type=int, default=None, help="nearest songs (server default 10)")
    names(p)

    p = add("add-songs", cmd_add_songs,
            "add songs to the live index (admin): a JSON list in song_meta.json's format")
    p.add_argument("file", type=Path)

    p = add("reload", cmd_reload, "load a bundle on the server and swap it in (admin)")
    p.add_argument("bundle", nargs="?", default="",
                   help="bundle directory on the server (default: reload the current one)")
    p.add_argument("--skip-verify", action="store_true", help="skip the sha256 checks")

    add("info", cmd_info, "what the server has loaded")

    p = add("health", cmd_health, "grpc.health.v1 status of the server and its services")
    p.add_argument("--service", default=None,
                   help="one service name ('' = the server); default: all three")
    return parser


def to_json(result: Any) -> str:
    is_instance = dataclasses.is_dataclass(result) and not isinstance(result, type)
    data = dataclasses.asdict(result) if is_instance else result
    return json.dumps(data, ensure_ascii=False, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0, 1 server error, 2 bad input)."""
    args = build_parser().parse_args(argv)
    where = f"{PROG} {args.command}"
    token = args.token
    if token is None and args.command in ("add-songs", "reload"):
        token = os.environ.get(ADMIN_TOKEN_ENV) or None
    try:
        roots = args.ca_cert.read_bytes() if args.ca_cert is not None else None
    except OSError as exc:
        print(f"{where}: --ca-cert {args.ca_cert}: unreadable ({exc.strerror})",
              file=sys.stderr)
        return 2
    retry = RetryPolicy(attempts=args.retries + 1) if args.retries > 0 else NO_RETRY
    try:
        with SongRecClient(args.target, token=token, tls=args.tls, root_certificates=roots,
                           deadline=args.deadline, retry=retry) as client:
            result, text = args.handler(client, args)
    except ClientError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    print(to_json(result) if args.json else text)
    if args.command == "health":
        return 0 if all(v == "SERVING" for v in result["status"].values()) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
