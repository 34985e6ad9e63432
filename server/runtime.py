"""The one way the server opens an ONNX model: ONNX Runtime on the CPU, threads set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort


def cpu_session(path: Path, threads: int = 1) -> Any:
    """An ``InferenceSession`` of ``path`` with ``threads`` intra-op threads, one inter-op
    thread, and no memory arena: an arena keeps its peak for the session's life, so one
    big batch (replaying the song store after a reload) pinned ~10 MB more RSS for good;
    freeing each call's buffers costs nothing measurable at the server's batch sizes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])
