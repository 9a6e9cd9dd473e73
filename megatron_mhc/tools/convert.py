"""Offline conversion of Megatron ``torch_dist`` checkpoints (``megatron-mhc convert ...``).

* ``plain-to-mhc``: a plain (residual) GPT checkpoint -> an mHC checkpoint for continued training.
  The new mHC parameters are function-preserving (gates alpha = 0, so every mapping equals its
  static residual-equivalent bias; phi random to break the stream symmetry), so the converted
  model computes the original's function.
* ``to-upstream`` / ``from-upstream``: this project's mHC parameter layout <-> Megatron-LM main's
  ``HyperConnectionModule`` layout (``mapping_proj.weight = phi^T``, ``alpha_pre/post/res`` =
  our ``alpha[0/1/2]``, ``bias`` identical ``[pre | post | res row-major]``).

What is converted: the model weights (every model ShardedTensor and ShardedObject, e.g. TE's
``_extra_state``) and the common state (args updated, iteration kept). Optimizer and RNG states
are dropped: continue with ``--no-load-optim --no-load-rng`` (fresh Adam moments; a short LR
warm-up is advisable). The input is only read; the output is written to a temporary folder next
to it and renamed into place at the end, so an interrupted conversion leaves nothing behind.

Runs in one process (a world-size-1 gloo group is created if none exists); it holds the whole
model in CPU memory.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mhc.core.config import MHCConfig
from megatron_mhc.core.hyper_connection import static_bias_init
from megatron_mhc.training.checkpoint_io import (
    TRACKER_FILE,
    CheckpointError,
    ModelCheckpoint,
    check_output_path,
    read_model_checkpoint,
    write_model_checkpoint,
)

OURS = {"attn": "attn_hc", "mlp": "mlp_hc"}
UPSTREAM = {"attn": "self_attention_hyper_connection", "mlp": "mlp_hyper_connection"}
LAYER_PREFIX = "decoder.layers."


class ConversionError(CheckpointError):
    """The conversion was refused; the message says why and what to do."""


# ------------------------------------------------------------------------------------------
# Layer layout helpers
# ------------------------------------------------------------------------------------------


def _sublayer_prefixes(tensors: Dict[str, Tensor]) -> List[Tuple[str, str, Optional[int]]]:
    """``(layer prefix, sublayer 'attn'|'mlp', number of stacked layers or None)`` for every
    sublayer present. Megatron stacks homogeneous layers in one tensor per parameter
    (``decoder.layers.<name>``, leading dim = layers); heterogeneous stacks use
    ``decoder.layers.<i>.<name>``."""
    found: Dict[Tuple[str, str], Optional[int]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(LAYER_PREFIX):
            continue
        rest = key[len(LAYER_PREFIX):]
        match = re.match(r"(\d+)\.(.*)", rest)
        prefix, name, stacked = (
            (f"{LAYER_PREFIX}{match.group(1)}.", match.group(2), None)
            if match else (LAYER_PREFIX, rest, tensor.shape[0])
        )
        if name.startswith("self_attention."):
            found.setdefault((prefix, "attn"), stacked)
        elif name.startswith("mlp."):
            found.setdefault((prefix, "mlp"), stacked)
    return [(p, s, n) for (p, s), n in sorted(found.items(), key=lambda kv: _layer_order(kv[0]))]


def _layer_order(item):
    prefix, sub = item
    match = re.search(r"\.(\d+)\.$", prefix)
    return (int(match.group(1)) if match else -1, sub)


def _mhc_keys(tensors: Dict[str, Tensor], names: Dict[str, str]) -> List[str]:
    return [k for k in tensors if any(f".{v}." in k for v in names.values())]


def _hidden_and_dtype(checkpoint: ModelCheckpoint) -> Tuple[int, torch.dtype]:
    args = checkpoint.args
    hidden = getattr(args, "hidden_size", None)
    dtype = None
    for key, tensor in checkpoint.tensors.items():
        if key.startswith(LAYER_PREFIX) and tensor.is_floating_point():
            dtype = tensor.dtype
            if hidden is None and key.endswith("input_layernorm.weight"):
                hidden = tensor.shape[-1]
            if hidden is not None:
                break
    if hidden is None or dtype is None:
        raise ConversionError("cannot find the hidden size (no args in the checkpoint and no "
                              "decoder.layers.*input_layernorm.weight)")
    return int(hidden), dtype


def _set_args(checkpoint: ModelCheckpoint, values: dict, remove: Iterable[str] = ()) -> None:
    args = checkpoint.args
    if args is None:
        return
    args = copy.copy(args)
    for name in remove:
        if hasattr(args, name):
            delattr(args, name)
    for name, value in values.items():
        setattr(args, name, value)
    checkpoint.common["args"] = args


# ------------------------------------------------------------------------------------------
# plain -> mHC
# ------------------------------------------------------------------------------------------


def add_mhc_parameters(
    checkpoint: ModelCheckpoint, mhc_config: MHCConfig, seed: int = 1234, std: Optional[float] = None
) -> int:
    """Add function-preserving mHC parameters for every sublayer (in place). Returns the count of
    sublayers. ``std``: phi's init std (default: the checkpoint's ``init_method_std`` or 0.02)."""
    if mhc_config.is_residual:
        raise ConversionError("--variant residual has no mHC parameters to add")
    if _mhc_keys(checkpoint.tensors, OURS) or _mhc_keys(checkpoint.tensors, UPSTREAM):
        raise ConversionError("the input already has mHC parameters (attn_hc / mlp_hc or "
                              "*_hyper_connection): it is not a plain checkpoint")
    hidden, dtype = _hidden_and_dtype(checkpoint)
    n, width = mhc_config.n, mhc_config.mapping_width
    std = std if std is not None else float(getattr(checkpoint.args, "init_method_std", 0.02))
    generator = torch.Generator().manual_seed(seed)
    bias = static_bias_init(mhc_config)
    sublayers = _sublayer_prefixes(checkpoint.tensors)
    if not sublayers:
        raise ConversionError("no decoder.layers.*.self_attention / mlp parameters found")
    for prefix, sub, stacked in sublayers:
        lead = () if stacked is None else (stacked,)
        name = f"{prefix}{OURS[sub]}."
        phi = torch.randn(*lead, n * hidden, width, generator=generator) * std
        checkpoint.tensors[name + "phi"] = phi.to(dtype)
        checkpoint.tensors[name + "alpha"] = torch.zeros(*lead, 3, dtype=dtype)
        checkpoint.tensors[name + "bias"] = bias.expand(*lead, width).to(dtype).clone()
    fields = mhc_config.as_dict()
    _set_args(checkpoint, {"enable_mhc": True, **{f"mhc_{k}": v for k, v in fields.items()},
                           "mhc_init_method": "function_preserving"})
    return sum(1 if stacked is None else stacked for _, _, stacked in sublayers)


# ------------------------------------------------------------------------------------------
# ours <-> upstream (Megatron-LM main HyperConnectionModule)
# ------------------------------------------------------------------------------------------

#: Largest relative difference of the mappings (H_pre, H_post, H_res) between a converted model
#: and upstream's HyperConnectionModule, with a margin over what tests/test_upstream_equivalence.py
#: measured (random parameters, float64): by the RMS of the n*C activation vector, and for H_res
#: logits of scale 150. Measured: 1.2e-7, 2.8e-4, 7.1e-2 and 0.11; 1.7e-3 at logit scale 10.
UPSTREAM_BOUNDS = {"rms_1": 1e-6, "rms_0.02": 1e-3, "rms_0.001": 0.2, "logits_150": 0.25}

UPSTREAM_DIFFERENCES = (
    "RMS normalisation: upstream multiplies by 1/(rms + eps), this project by rsqrt(mean(x^2) + "
    "eps) (eps = 1e-6): the two differ by about eps/(2 rms^2) relative, so the mappings agree "
    "to 1e-6 for activations of RMS ~1, to 1e-3 at RMS 0.02 (e.g. a first layer at init with "
    "std 0.02) and only to 0.2 at RMS 1e-3",
    "Sinkhorn: upstream normalises exp(H - rowmax) in the linear domain with sums clamped at "
    "1e-6, this project in the log domain: the same fixed point, but after 20 iterations H_res "
    "differs by up to 2e-3 for logits of scale 10 and up to 0.25 for logits near +-150",
    "recompute settings (--mhc-recompute-block vs mhc_recompute_layer_num) are training options, "
    "not checkpoint state; set them on the new command line",
)


def _rename_sublayers(prefix: str, source: Dict[str, str], target: Dict[str, str]) -> str:
    """``decoder.layers.<...>.attn_hc.`` <-> ``..self_attention_hyper_connection.`` (and MLP)."""
    for sub in ("attn", "mlp"):
        prefix = prefix.replace(f".{source[sub]}.", f".{target[sub]}.")
    return prefix


def _arg(args, name: str, default):
    """``args.name``, or ``default`` when absent or None (0 and 0.0 are kept)."""
    value = getattr(args, name, None)
    return default if value is None else value


def to_upstream(checkpoint: ModelCheckpoint) -> int:
    """Rename / reshape our mHC parameters into the upstream layout (in place)."""
    args = checkpoint.args
    variant = getattr(args, "mhc_variant", None) or "mhc"
    if variant != "mhc":
        raise ConversionError(
            f"--mhc-variant {variant} has no upstream equivalent: Megatron-LM main implements "
            "only the Sinkhorn-constrained mhc variant")
    keys = _mhc_keys(checkpoint.tensors, OURS)
    if not keys:
        raise ConversionError("no attn_hc / mlp_hc parameters: not a megatron-mhc checkpoint")
    count = 0
    for key in sorted(keys):
        if not key.endswith(".phi"):
            continue
        base = key[: -len("phi")]
        new_base = _rename_sublayers(base, OURS, UPSTREAM)
        phi = checkpoint.tensors.pop(base + "phi")
        alpha = checkpoint.tensors.pop(base + "alpha")
        bias = checkpoint.tensors.pop(base + "bias")
        checkpoint.tensors[new_base + "mapping_proj.weight"] = phi.transpose(-1, -2).contiguous()
        for index, gate in enumerate(("alpha_pre", "alpha_post", "alpha_res")):
            checkpoint.tensors[new_base + gate] = alpha[..., index:index + 1].contiguous()
        checkpoint.tensors[new_base + "bias"] = bias
        count += 1
    defaults = MHCConfig()
    _set_args(checkpoint, {
        "enable_mhc_connections": True,
        "mhc_num_residual_streams": _arg(args, "mhc_expansion_rate", defaults.expansion_rate),
        "mhc_sinkhorn_iterations": _arg(args, "mhc_sinkhorn_iters", defaults.sinkhorn_iters),
        "mhc_init_gating_factor": _arg(args, "mhc_gate_init", defaults.gate_init),
    }, remove=[a for a in vars(args or argparse.Namespace()) if a.startswith("mhc_") or a == "enable_mhc"])
    return count


def from_upstream(checkpoint: ModelCheckpoint) -> int:
    """Rename / reshape upstream ``HyperConnectionModule`` parameters into ours (in place)."""
    keys = _mhc_keys(checkpoint.tensors, UPSTREAM)
    if not keys:
        raise ConversionError("no *_hyper_connection parameters: not an upstream mHC checkpoint")
    count = 0
    for key in sorted(keys):
        if not key.endswith(".mapping_proj.weight"):
            continue
        base = key[: -len("mapping_proj.weight")]
        new_base = _rename_sublayers(base, UPSTREAM, OURS)
        weight = checkpoint.tensors.pop(key)
        gates = [checkpoint.tensors.pop(base + g) for g in ("alpha_pre", "alpha_post", "alpha_res")]
        checkpoint.tensors[new_base + "phi"] = weight.transpose(-1, -2).contiguous()
        checkpoint.tensors[new_base + "alpha"] = torch.cat(gates, dim=-1)
        checkpoint.tensors[new_base + "bias"] = checkpoint.tensors.pop(base + "bias")
        count += 1
    args = checkpoint.args
    n = getattr(args, "mhc_num_residual_streams", None)
    if n is None:
        width = checkpoint.tensors[next(k for k in checkpoint.tensors if k.endswith(".bias")
                                        and f".{OURS['attn']}." in k)].shape[-1]
        n = int(round(math.sqrt(width + 1) - 1))  # n^2 + 2n = width
    defaults = MHCConfig()
    _set_args(checkpoint, {
        "enable_mhc": True,
        "mhc_variant": "mhc",
        "mhc_expansion_rate": n,
        "mhc_sinkhorn_iters": _arg(args, "mhc_sinkhorn_iterations", defaults.sinkhorn_iters),
        "mhc_gate_init": _arg(args, "mhc_init_gating_factor", defaults.gate_init),
    }, remove=["enable_mhc_connections", "mhc_num_residual_streams", "mhc_sinkhorn_iterations",
               "mhc_init_gating_factor", "mhc_recompute_layer_num"])
    return count


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def convert(kind: str, source: Path, out: Path, overwrite: bool = False,
            mhc_config: Optional[MHCConfig] = None, seed: int = 1234) -> str:
    """Run one conversion end to end; returns a one-line summary."""
    source, out = Path(source), Path(out)
    if kind not in ("plain-to-mhc", "to-upstream", "from-upstream"):
        raise ConversionError(f"unknown conversion {kind!r}; allowed: plain-to-mhc, to-upstream, "
                              "from-upstream")
    check_output_path(out, overwrite, source)  # refuse before the (slow) read
    bar = _progress(3, f"convert {kind}")
    checkpoint = read_model_checkpoint(source)
    bar.update(1)
    if kind == "plain-to-mhc":
        count = add_mhc_parameters(checkpoint, mhc_config or MHCConfig(), seed=seed)
        what = f"added function-preserving mHC parameters to {count} sublayers"
    elif kind == "to-upstream":
        count = to_upstream(checkpoint)
        what = f"converted {count} sublayers to the upstream HyperConnectionModule layout"
    else:
        count = from_upstream(checkpoint)
        what = f"converted {count} sublayers from the upstream HyperConnectionModule layout"
    bar.update(1)
    written = write_model_checkpoint(checkpoint, out, overwrite=overwrite, source=source)
    bar.update(1)
    bar.close()
    return (f"{written}: {what}; optimizer and RNG state dropped (train with --no-load-optim "
            "--no-load-rng)")


def main(argv: List[str]) -> int:
    """``megatron-mhc convert {plain-to-mhc,to-upstream,from-upstream} SRC OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="megatron-mhc convert",
        description="Convert Megatron torch_dist checkpoints (model weights; never modifies SRC).")
    parser.add_argument("kind", choices=("plain-to-mhc", "to-upstream", "from-upstream"))
    parser.add_argument("source", type=Path, help="checkpoint root (with "
                        f"{TRACKER_FILE}) or an iteration directory")
    parser.add_argument("out", type=Path, help="output path (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--expansion-rate", type=int, default=4, help="plain-to-mhc: n")
    parser.add_argument("--variant", choices=("mhc", "hc"), default="mhc", help="plain-to-mhc")
    parser.add_argument("--seed", type=int, default=1234, help="plain-to-mhc: seed for phi")
    args = parser.parse_args(argv)
    try:
        mhc_config = MHCConfig(expansion_rate=args.expansion_rate, variant=args.variant,
                               init_method="function_preserving")
        print(convert(args.kind, args.source, args.out, args.overwrite, mhc_config, args.seed))
    except (CheckpointError, ValueError) as exc:
        print(f"megatron-mhc convert: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.kind != "plain-to-mhc":
        print("note: the two layouts differ only in: " + "; ".join(UPSTREAM_DIFFERENCES))
    return 0
