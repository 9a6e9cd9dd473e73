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
import dataclasses
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mhc.config import MHCConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: ShardedTensor / ShardedObject keys that are not model state (dropped by the conversions).
NON_MODEL_KEY_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine_state", "common_state")
#: Entries of the common state dict that are not model state.
NON_MODEL_COMMON_KEYS = ("optimizer", "rng_state", "rerun_state_machine", "content_metadata")

OURS = {"attn": "attn_hc", "mlp": "mlp_hc"}
UPSTREAM = {"attn": "self_attention_hyper_connection", "mlp": "mlp_hyper_connection"}
LAYER_PREFIX = "decoder.layers."


class ConversionError(RuntimeError):
    """The conversion was refused; the message says why and what to do."""


@dataclasses.dataclass
class ModelCheckpoint:
    """The model part of a Megatron ``torch_dist`` checkpoint, held in memory."""

    common: dict
    tensors: Dict[str, Tensor]  # ShardedTensor key -> the whole (global) tensor
    objects: Dict[str, object]  # unique key -> ShardedObject (data loaded)
    content_metadata: Optional[dict]
    iteration: Optional[str]  # the tracker's content ("release" or a number), None for a bare dir

    @property
    def args(self):
        """The training args stored with the checkpoint (``argparse.Namespace``) or None."""
        return self.common.get("args")


def locate_checkpoint(path: Path) -> Tuple[Path, Optional[str]]:
    """``(iteration dir, tracker content)`` of a checkpoint root (with the tracker file) or of an
    iteration directory itself."""
    path = Path(path)
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        label = tracker.read_text().strip()
        sub = "release" if label == "release" else f"iter_{int(label):07d}"
        return path / sub, label
    if (path / "metadata.json").is_file():
        return path, None
    if (path / "mp_rank_00").is_dir() or any(path.glob("mp_rank_*")):
        raise ConversionError(
            f"{path} is a legacy --ckpt-format torch checkpoint; convert it to torch_dist first "
            "(load it in Megatron with --ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
    raise ConversionError(
        f"{path} is not a Megatron torch_dist checkpoint (neither {TRACKER_FILE} nor metadata.json)")


def ensure_process_group() -> None:
    """dist-ckpt needs a process group: create a world-size-1 gloo group if there is none."""
    if torch.distributed.is_initialized():
        return
    from megatron_mhc.testing.megatron_cpu import free_port

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _is_model_key(key: str) -> bool:
    return not key.startswith(NON_MODEL_KEY_PREFIXES)


def read_model_checkpoint(path: Path) -> ModelCheckpoint:
    """Load every model tensor and object of the checkpoint at ``path`` (never modified)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    ensure_process_group()
    iter_dir, label = locate_checkpoint(path)
    wanted = {k: v for k, v in load_sharded_metadata(str(iter_dir)).items()
              if _is_model_key(v.key)}
    loaded = dist_checkpointing.load(wanted, str(iter_dir), validate_access_integrity=False)
    tensors, objects = {}, {}  # (load() also returns the common state: keep only ours)
    for unique_key, meta in wanted.items():
        if isinstance(meta, ShardedObject):
            objects[unique_key] = dataclasses.replace(meta, data=loaded[unique_key])
        else:
            tensors[meta.key] = loaded[unique_key]
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    content_metadata = common.get("content_metadata")
    common = {k: v for k, v in common.items() if k not in NON_MODEL_COMMON_KEYS}
    return ModelCheckpoint(common, tensors, objects, content_metadata, label)


def write_model_checkpoint(
    checkpoint: ModelCheckpoint, out: Path, overwrite: bool = False, source: Optional[Path] = None
) -> Path:
    """Write ``checkpoint`` as a torch_dist checkpoint at ``out`` (root with tracker file when the
    source had one). Refuses an existing ``out`` unless ``overwrite``; atomic (temp dir + rename)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = Path(out).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConversionError(f"output {out} overlaps the input {src}: choose another path")
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} exists; pass --overwrite to replace it")
    ensure_process_group()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if checkpoint.iteration is None:
            iter_dir = tmp
        else:
            label = checkpoint.iteration
            iter_dir = tmp / ("release" if label == "release" else f"iter_{int(label):07d}")
        iter_dir.mkdir(parents=True)
        model = {
            key: ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
            for key, tensor in checkpoint.tensors.items()
        }
        for index, obj in enumerate(checkpoint.objects.values()):
            model[f"object_{index}"] = obj  # dict keys are free; the object's own key is saved
        state = dict(checkpoint.common)
        state["model"] = model
        dist_checkpointing.save(
            state, str(iter_dir), content_metadata=checkpoint.content_metadata
        )
        if checkpoint.iteration is not None:
            (tmp / TRACKER_FILE).write_text(str(checkpoint.iteration))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    from megatron_mhc.hyper_connection import static_bias_init

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

UPSTREAM_DIFFERENCES = (
    "RMS normalisation: upstream divides by (rms + eps), ours multiplies by rsqrt(mean(x^2) + "
    "eps); identical up to eps (1e-6) relative",
    "Sinkhorn: upstream normalises in the linear domain with a 1e-6 clamp, ours in the log "
    "domain; identical fixed point for finite logits",
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
    out_resolved = out.resolve()
    if out_resolved.exists() and not overwrite:  # refuse before the (slow) read
        raise ConversionError(f"output {out_resolved} exists; pass --overwrite to replace it")
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
    except (ConversionError, ValueError) as exc:
        print(f"megatron-mhc convert: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.kind != "plain-to-mhc":
        print("note: the two layouts differ only in: " + "; ".join(UPSTREAM_DIFFERENCES))
    return 0
