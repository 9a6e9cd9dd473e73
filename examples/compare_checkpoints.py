"""Are two Megatron torch_dist checkpoints bit-identical? (model weights, optimizer state, RNG)

    python examples/compare_checkpoints.py RUN_A/iter_0000020 RUN_B/iter_0000020

Used to show that resuming (first run stopped with --exit-interval, second run --load) reproduces
an uninterrupted run exactly. Reads each checkpoint's every entry through PyTorch's distributed
checkpoint format (no process group) and compares tensors with ``torch.equal`` and serialized
objects by their bytes; prints a summary and exits 1 on any difference.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import torch


def read_all(path: Path) -> dict:
    """Every entry of a torch_dist checkpoint folder, by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "all.pt"
        dcp_to_torch_save(str(path), str(target))
        return torch.load(target, weights_only=False)


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def _same(x, y) -> bool:
    """Equality of nested objects that may hold tensors (serialized objects by their bytes)."""
    x = x.getvalue() if isinstance(x, io.BytesIO) else x
    y = y.getvalue() if isinstance(y, io.BytesIO) else y
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and x.dtype == y.dtype and torch.equal(x, y))
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return repr(x) == repr(y)


def compare(path_a: Path, path_b: Path) -> int:
    """Print how the two checkpoints differ; 0 when bit-identical."""
    a, b = {}, {}
    _flatten("", read_all(path_a), a)
    _flatten("", read_all(path_b), b)
    only = sorted(set(a) ^ set(b))
    tensors = equal = 0
    differing = []
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            tensors += 1
            if _same(x, y):
                equal += 1
            else:
                diff = ((x.double() - y.double()).abs().max().item()
                        if x.shape == y.shape else float("nan"))
                differing.append(f"{key}: max |diff| {diff:.3e}")
        elif not _same(x, y):
            differing.append(f"{key}: objects differ")
    print(f"{path_a} vs {path_b}: {tensors} tensors, {equal} bit-identical; "
          f"{len(a) - tensors} other entries; {len(differing)} differing; {len(only)} keys in one only")
    for line in (differing + [f"only in one: {k}" for k in only])[:20]:
        print("  " + line)
    return 0 if not differing and not only else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
