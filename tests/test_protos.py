"""The committed generated gRPC code matches ``protos/songrec/v1/songrec.proto`` (run
``make protos`` when this fails), and imports under its package path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("protos/songrec/v1")
GENERATED = ("songrec_pb2.py", "songrec_pb2.pyi", "songrec_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / PACKAGE).mkdir(parents=True)
    shutil.copy(ROOT / PACKAGE / "songrec.proto", tmp_path / PACKAGE / "songrec.proto")
    # The same command as `make protos`, run on a copy so that paths match.
    args = ["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(tmp_path / PACKAGE / "songrec.proto")]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / PACKAGE / name).read_text()
        committed = (ROOT / PACKAGE / name).read_text()
        assert committed == fresh, f"{PACKAGE / name} is stale: run `make protos`"


def test_generated_code_imports_under_its_package() -> None:
    from protos.songrec.v1 import songrec_pb2, songrec_pb2_grpc

    assert songrec_pb2.DESCRIPTOR.package == "songrec.v1"
    assert {s.full_name for s in songrec_pb2.DESCRIPTOR.services_by_name.values()} == \
        {"songrec.v1.Recommender", "songrec.v1.Admin"}
    assert hasattr(songrec_pb2_grpc, "RecommenderStub")
    assert hasattr(songrec_pb2_grpc, "AdminServicer")
