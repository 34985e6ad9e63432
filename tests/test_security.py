"""Security of the server: every admin RPC refused without the admin token (and nothing
changed), every inference RPC refused without the inference token when one is required,
TLS end to end with a certificate made here, tokens in no log line or status message, and
loopback-only binding by default."""

from __future__ import annotations

import ipaddress
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.benchtools import ServerProcess
from clients.client import ClientError, NewSong, RetryPolicy, SongMetadata, SongRecClient
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ServerConfig, load_config
from server.testing import ServerThread

ADMIN = "adm-7bQx2ZpL9vKc4TfW"
INFERENCE = "inf-3hNs8RyD1mGu6JeA"
WRONG = "wrong-5kVt0CwX2oPz7YiB"  # what a caller might send by mistake: also a secret
Code = grpc.StatusCode
GOOD_SONG = pb2.NewSong(song_id=80_000_001, metadata=pb2.SongMetadata(genres=["GN0100"]))

INFERENCE_CALLS: list[tuple[str, Any]] = [
    ("ContinuePlaylist", pb2.ContinuePlaylistRequest(seed_song_ids=[1, 2])),
    ("SimilarSongs", pb2.SimilarSongsRequest(song_id=1, k=3)),
    ("SimilarSongsBatch", pb2.SimilarSongsBatchRequest(song_ids=[1, 2], k=3)),
    ("EncodeSong", pb2.EncodeSongRequest(song=pb2.SongMetadata(genres=["GN0100"]))),
    ("GetModelInfo", pb2.GetModelInfoRequest()),
]
ADMIN_CALLS: list[tuple[str, Any]] = [
    ("AddSongs", pb2.AddSongsRequest(songs=[GOOD_SONG])),
    ("ReloadModel", pb2.ReloadModelRequest()),
]
# (authorization header or None, the code it gets) for a caller without the right token.
BAD_CREDENTIALS: list[tuple[str | None, grpc.StatusCode]] = [
    (None, Code.UNAUTHENTICATED),
    ("", Code.UNAUTHENTICATED),
    ("Bearer", Code.UNAUTHENTICATED),
    ("Bearer    ", Code.UNAUTHENTICATED),
    (f"Basic {ADMIN}", Code.UNAUTHENTICATED),
    (ADMIN, Code.UNAUTHENTICATED),  # the token without its scheme
    (f"Bearer {WRONG}", Code.PERMISSION_DENIED),
    (f"Bearer {ADMIN[:-1]}", Code.PERMISSION_DENIED),
    (f"Bearer {ADMIN}x", Code.PERMISSION_DENIED),
    (f"Bearer {ADMIN.upper()}", Code.PERMISSION_DENIED),
]


def call(channel: grpc.Channel, service: str, method: str, request: Any,
         header: str | None) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with an authorization header (None: none); code and details."""
    stub = (pb2_grpc.AdminStub if service == "Admin" else pb2_grpc.RecommenderStub)(channel)
    metadata = [] if header is None else [("authorization", header)]
    try:
        getattr(stub, method)(request, metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return Code.OK, ""


@pytest.fixture
def guarded(tiny_bundle: Path, tmp_path: Path) -> Iterator[ServerThread]:
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, token=INFERENCE,
                          data_dir=tmp_path / "state", verify=False)
    with ServerThread(config) as live:
        yield live


# ---------------------------------------------------------------- tokens


def test_admin_rpcs_refused_without_the_admin_token_change_nothing(
        guarded: ServerThread, tmp_path: Path) -> None:
    with guarded.channel() as channel:
        before = pb2_grpc.RecommenderStub(channel).GetModelInfo(
            pb2.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {ADMIN}")])
        headers = [*BAD_CREDENTIALS, (f"Bearer {INFERENCE}", Code.PERMISSION_DENIED)]
        for method, request in ADMIN_CALLS:
            for header, expected in headers:
                code, details = call(channel, "Admin", method, request, header)
                assert code == expected, (method, header, code, details)
                assert ADMIN not in details and INFERENCE not in details \
                    and WRONG not in details
            # Authorization comes before anything else: a bad request from a caller
            # without the token learns nothing about what would be wrong with it.
            code, _ = call(channel, "Admin", method, type(request)(), None)
            assert code == Code.UNAUTHENTICATED
            raw = channel.unary_unary(f"/songrec.v1.Admin/{method}")
            with pytest.raises(grpc.RpcError) as exc:
                raw(b"\xff\xff not a message", timeout=30)
            assert exc.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]
        after = pb2_grpc.RecommenderStub(channel).GetModelInfo(
            pb2.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {ADMIN}")])
    assert after.added_songs == before.added_songs == 0
    assert after.model_version == before.model_version
    registry = guarded.server.state.metrics.registry
    assert registry.get_sample_value("songrec_reloads_total", {"result": "ok"}) is None
    store = guarded.server.state.store
    assert store is not None and store.count() == 0
    # The admin token does what the others could not.
    with guarded.channel() as channel:
        for method, request in ADMIN_CALLS:
            assert call(channel, "Admin", method, request, f"Bearer {ADMIN}")[0] == Code.OK


@pytest.mark.parametrize(("method", "request_"), INFERENCE_CALLS,
                         ids=[m for m, _ in INFERENCE_CALLS])
def test_inference_rpcs_need_the_required_token(guarded: ServerThread, method: str,
                                                request_: Any) -> None:
    with guarded.channel() as channel:
        for header, expected in BAD_CREDENTIALS:
            code, details = call(channel, "Recommender", method, request_, header)
            assert code == expected, (header, code, details)
            assert WRONG not in details and ADMIN not in details
        for token in (INFERENCE, ADMIN):
            for scheme in ("Bearer", "bearer"):
                header = f"{scheme} {token}"
                assert call(channel, "Recommender", method, request_, header)[0] == Code.OK


def test_probes_need_no_token(guarded: ServerThread) -> None:
    with guarded.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflection.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "songrec.v1.Admin" in {s.name for s in reply.list_services_response.service}


def test_probes_with_malformed_payloads_get_invalid_argument(
        guarded: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that are no message, sent to health or reflection, get INVALID_ARGUMENT
    (gRPC's own deserializer answered UNKNOWN and logged a traceback)."""
    junk = b"\xff\xff\xff"
    with caplog.at_level("DEBUG"), guarded.channel() as channel:
        calls = [("Check", channel.unary_unary("/grpc.health.v1.Health/Check"), junk),
                 ("Watch", channel.unary_stream("/grpc.health.v1.Health/Watch"), junk),
                 ("ServerReflectionInfo", channel.stream_stream(
                     "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
                  iter([junk]))]
        for name, method, payload in calls:
            with pytest.raises(grpc.RpcError) as exc:
                reply = method(payload, timeout=10)
                if name != "Check":
                    list(reply)
            assert exc.value.code() == Code.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert f"not a valid {name} request message" in \
                exc.value.details()  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# ---------------------------------------------------------------- TLS end to end


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (key, certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def test_tls_end_to_end_with_tokens(tiny_bundle: Path, tmp_path: Path) -> None:
    """The command serves TLS with a self-signed certificate; the typed client talks to it
    with tokens; plaintext and clients that do not trust the certificate get nowhere."""
    key, cert = make_certificate(tmp_path, "server")
    _, other = make_certificate(tmp_path, "other")
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(ADMIN + "\n")
    admin_file.chmod(0o600)
    args = ["--bundle", str(tiny_bundle), "--no-verify", "--tls-cert", str(cert),
            "--tls-key", str(key), "--admin-token-file", str(admin_file),
            "--data-dir", str(tmp_path / "state")]
    with ServerProcess(args, env={"SONGREC_TOKEN": INFERENCE}) as server:
        target = f"localhost:{server.port}"
        roots = cert.read_bytes()
        with SongRecClient(target, token=INFERENCE, root_certificates=roots) as client:
            assert len(client.similar(1, k=4).neighbours) == 4
            assert len(client.continue_playlist([1, 2, 3]).songs) == 100
            with pytest.raises(ClientError) as denied:
                client.add_songs([NewSong(80_000_002, SongMetadata(genres=("GN0100",)))])
            assert denied.value.code == Code.PERMISSION_DENIED
        with SongRecClient(target, token=ADMIN, root_certificates=roots) as admin:
            added = admin.add_songs([NewSong(80_000_002, SongMetadata(genres=("GN0100",)))])
            assert added.added_song_ids == (80_000_002,)
            assert admin.reload_model().current.loaded
            assert admin.model_info().added_songs == 1
        no_retry = RetryPolicy(attempts=1)
        with SongRecClient(target, token=INFERENCE, root_certificates=other.read_bytes(),
                           retry=no_retry, deadline=10) as untrusting:
            with pytest.raises(ClientError) as untrusted:
                untrusting.similar(1)
            assert untrusted.value.code == Code.UNAVAILABLE
        with SongRecClient(server.target, token=INFERENCE, retry=no_retry,
                           deadline=10) as plain:
            with pytest.raises(ClientError) as plaintext:
                plain.similar(1)
            assert plaintext.value.code == Code.UNAVAILABLE
        assert server.stop() == 0
    assert ADMIN not in "".join(server.log_lines())


# ---------------------------------------------------------------- no token in any log


def test_tokens_never_reach_logs_messages_or_metrics(tiny_bundle: Path,
                                                     tmp_path: Path) -> None:
    """At DEBUG, through right, wrong and malformed tokens, admin calls, a failed reload
    and a drain: no token appears in the server's output, its status messages or its
    metrics. (gRPC's own tracing, GRPC_TRACE=http, would print headers: see
    docs/OPERATIONS.md.)"""
    token_file = tmp_path / "inference.token"
    token_file.write_text(INFERENCE)
    args = ["--bundle", str(tiny_bundle), "--no-verify", "--log-level", "DEBUG",
            "--token-file", str(token_file), "--data-dir", str(tmp_path / "state"),
            "--metrics-port", "0"]
    details: list[str] = []
    with ServerProcess(args, env={"SONGREC_ADMIN_TOKEN": ADMIN}) as server, \
            grpc.insecure_channel(server.target) as channel:
        headers = [f"Bearer {t}" for t in (ADMIN, INFERENCE, WRONG)] + [
            ADMIN, f"Basic {INFERENCE}", f"Bearer {WRONG} {ADMIN}"]
        for header in headers:
            for method, request in INFERENCE_CALLS[:2]:
                details.append(call(channel, "Recommender", method, request, header)[1])
            for method, request in ADMIN_CALLS:
                details.append(call(channel, "Admin", method, request, header)[1])
        details.append(call(channel, "Admin", "ReloadModel", pb2.ReloadModelRequest(
            bundle_path=str(tmp_path / "nope")), f"Bearer {ADMIN}")[1])
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    output = "".join(server.log_lines())
    assert "reload of" in output and "DEBUG" in output  # the calls were logged
    for secret in (ADMIN, INFERENCE, WRONG):
        assert secret not in output
        assert not any(secret in d for d in details)


def test_tokens_kept_out_of_config_repr_and_metrics(tiny_bundle: Path) -> None:
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, token=INFERENCE,
                          metrics_port=0, verify=False)
    assert ADMIN not in repr(config) and INFERENCE not in repr(config)

    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, token=INFERENCE,
                          metrics_port=free_port(), verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        call(channel, "Admin", "ReloadModel", pb2.ReloadModelRequest(), f"Bearer {WRONG}")
        call(channel, "Recommender", "SimilarSongs", INFERENCE_CALLS[1][1], f"Bearer {ADMIN}")
        body = urllib.request.urlopen(f"http://127.0.0.1:{live.server.metrics_port}/metrics",
                                      timeout=10).read().decode()
    assert 'code="PERMISSION_DENIED",method="ReloadModel"' in body
    for secret in (ADMIN, INFERENCE, WRONG):
        assert secret not in body


# ---------------------------------------------------------------- binding


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6,
    which write an address as 32-bit words in host byte order)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            words = [bytes.fromhex(address[i:i + 8]) for i in range(0, len(address), 8)]
            raw = b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)
            found.add(ipaddress.ip_address(raw))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC binds 127.0.0.1 as ::ffff:...
    return (mapped or address).is_loopback


def test_binds_loopback_only_by_default(tiny_bundle: Path) -> None:
    assert ServerConfig().host == "127.0.0.1"
    config = load_config(["--bundle", str(tiny_bundle), "--port", "0", "--no-verify"],
                         environ={})
    assert config.host == "127.0.0.1"
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    with ServerProcess(["--bundle", str(tiny_bundle), "--no-verify"], host=None) as server:
        assert any(m.startswith(f"listening on 127.0.0.1:{server.port} ")
                   for m in server.messages())
        addresses = listening_addresses(server.port)
        assert addresses and all(is_loopback(a) for a in addresses), addresses
        assert server.stop() == 0
