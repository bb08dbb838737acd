"""A CRI client for tests, compiled from runtime.proto when first imported.

Kubernetes pulls through containerd's CRI plugin, which sends lazysnap the `cri.*`
labels; this is how the tests act as a kubelet without crictl (bookworm has none).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent


def load() -> tuple[ModuleType, ModuleType]:
    """(runtime_pb2, runtime_pb2_grpc), generated into a temp dir on first use."""
    if "runtime_pb2" not in sys.modules:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="lzs-cri-")
        if protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(HERE / "runtime.proto")]) != 0:
            raise RuntimeError("protoc failed on tests/cri/runtime.proto")
        sys.path.insert(0, out)
    return importlib.import_module("runtime_pb2"), importlib.import_module("runtime_pb2_grpc")
