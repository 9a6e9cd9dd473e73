"""Building and loading the CUDA C++ kernels of this folder: each ``.cu`` has no torch headers and
a C interface, so nvcc builds it in seconds into a shared library loaded through ctypes (no
dependence on torch's C++ ABI). Libraries go under ``$MHC_CUDA_BUILD_DIR`` (default
``~/.cache/megatron_mhc/cuda``), named by a hash of the source and the flags."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

#: nvcc flags of every kernel here (Hopper: the kernels use sm_90 features).
FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-shared",
         "-Xcompiler", "-fPIC", "-lineinfo"]


def nvcc_path() -> Optional[str]:
    """nvcc from CUDA_HOME / CUDA_PATH, PATH or /usr/local/cuda (None: not found)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return None


def library_path(source: Path, stem: str, flags=FLAGS) -> Path:
    """Where the library built from ``source`` with ``flags`` lives (built or not)."""
    digest = hashlib.sha1(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MHC_CUDA_BUILD_DIR",
                               Path.home() / ".cache" / "megatron_mhc" / "cuda"))
    return root / f"{stem}_{digest}.so"


def build_library(source: Path, target: Path, flags=FLAGS) -> None:
    """nvcc ``source`` into ``target`` (atomic: concurrent builders leave one complete file);
    RuntimeError with nvcc's message when it fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([nvcc, *flags, "-o", str(out), str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}): {proc.stderr[-2000:]}")
        os.replace(out, target)


class Library:
    """One ``.cu`` built on first use and loaded once; ``declare(lib)`` sets the ctypes
    signatures. ``get()`` returns the ``ctypes.CDLL`` or raises RuntimeError with the reason
    (remembered: a failed build is not retried in the same process)."""

    def __init__(self, source: Path, stem: str, what: str, declare: Callable):
        self.source, self.stem, self.what, self.declare = source, stem, what, declare
        self._lib, self._error = None, None
        self._lock = threading.Lock()

    def path(self) -> Path:
        return library_path(self.source, self.stem)

    def get(self):
        if self._lib is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._error is None:
                try:
                    path = self.path()
                    if not path.is_file():
                        build_library(self.source, path)
                    lib = ctypes.CDLL(str(path))
                    self.declare(lib)
                    self._lib = lib
                except (OSError, RuntimeError) as exc:
                    self._error = f"{self.what} unavailable: {exc}"
        if self._lib is None:
            raise RuntimeError(self._error)
        return self._lib


def hopper_problem(device=None) -> Optional[str]:
    """Why the kernels here cannot run on ``device`` (default: the current CUDA device): no CUDA
    device, or not compute capability 9.x; None when they can (nothing is built)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs a Hopper GPU (sm_90), found sm_{major}{minor}"
    return None


def hopper_availability(library: Library, device=None):
    """(usable, reason): ``device`` (default: the current one) passes ``hopper_problem`` and
    ``library`` builds and loads (built on the first call)."""
    problem = hopper_problem(device)
    if problem is not None:
        return False, problem
    try:
        library.get()
    except RuntimeError as exc:
        return False, str(exc)
    return True, "ok"
