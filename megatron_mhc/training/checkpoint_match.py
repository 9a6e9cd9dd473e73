"""Does the checkpoint Megatron is about to load hold the model the mHC flags ask for?

``validate_mhc_args`` (run at the end of Megatron's ``validate_args``, with or without
``--enable-mhc``, by the patch set and by ``megatron-mhc launch``) calls
``check_checkpoint_matches_flags``. Without it a mismatch fails deep inside
torch.distributed.checkpoint (a plain checkpoint under ``--enable-mhc``: missing keys; another
``--mhc-expansion-rate``: shape errors) or, worse, loads silently into another model (an mHC
checkpoint without ``--enable-mhc``: the mHC parameters are dropped as unexpected keys; ``mhc`` <->
``hc``: identical shapes).

What it reads, never writes: the checkpoint Megatron's ``load_checkpoint`` would pick (``--load``
when it has a tracker file, else ``--pretrained-checkpoint``; the iteration from the tracker or
``--ckpt-step``), its ``.metadata`` (parameter names and global shapes: are there mHC parameters,
and n from their width) and its common state's stored training args (the variant, which shapes
cannot tell). Nothing to load (no tracker file, no ``--load``) is a fresh run and passes; a
checkpoint this check cannot read (another format, a damaged file) is left to Megatron's loader.
``--use-checkpoint-args`` does not matter: Megatron takes no ``--mhc-*`` flag from the checkpoint.
A ``--mhc-variant residual`` model has no mHC parameters (one stream): it matches plain checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from megatron_mhc.core.config import FLAG_NAMES, MHCConfig, mhc_config_from_args

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # as checkpoint_io (not imported: torch)
#: Parameter-name parts of this project's mHC parameters and of Megatron-LM main's layout.
OUR_PARTS = (".attn_hc.", ".mlp_hc.")
UPSTREAM_PARTS = ("_hyper_connection.",)


@dataclasses.dataclass
class CheckpointModel:
    """What the checkpoint holds: ``mhc`` None for a model without mHC parameters."""

    root: Path  # what --load / --pretrained-checkpoint names
    iter_dir: Path
    mhc: Optional[MHCConfig]  # n from the parameter shapes, the variant from the stored args
    variant_known: bool  # False: mHC parameters, but the stored args do not say mhc or hc
    upstream: bool = False  # Megatron-LM main's HyperConnectionModule layout

    def describe(self) -> str:
        if self.upstream:
            return (f"an mHC model in Megatron-LM main's HyperConnectionModule layout "
                    f"(n={self.mhc.n})")
        if self.mhc is None:
            return "a model without mHC parameters (plain)"
        variant = self.mhc.variant if self.variant_known else "mhc or hc (its args do not say)"
        return f"an mHC model (n={self.mhc.n}, variant {variant})"


def checkpoint_dir_to_load(args: Any) -> Optional[Tuple[Path, Path]]:
    """``(root, iteration dir)`` of the torch_dist checkpoint Megatron's ``load_checkpoint`` would
    load for ``args``, or None (a fresh run, or a checkpoint this check does not read)."""
    load = getattr(args, "load", None)
    pretrained = getattr(args, "pretrained_checkpoint", None)
    step = getattr(args, "ckpt_step", None)
    root = None
    if load is not None and (Path(load) / TRACKER_FILE).is_file():
        root = Path(load)
    elif pretrained is not None and (Path(pretrained) / TRACKER_FILE).is_file():
        root = Path(pretrained)  # load_checkpoint falls back to it (and sets --finetune)
    elif load is not None and step:
        root = Path(load)  # _load_base_checkpoint: --ckpt-step without a tracker file
    if root is None:
        return None
    release = False
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        label = tracker.read_text().strip()
        release = label == "release"
        if not release and not label.isdigit():
            return None  # Megatron's read_metadata reports a bad tracker file
        iteration = 0 if release else int(label)
    if step:
        iteration = int(step)
    iter_dir = root / ("release" if release else f"iter_{iteration:07d}")
    if not (iter_dir / "metadata.json").is_file() or not (iter_dir / ".metadata").is_file():
        return None  # nothing there, or not torch_dist: Megatron's loader says so
    return root, iter_dir


def _parameter_shapes(iter_dir: Path) -> Dict[str, Tuple[int, ...]]:
    """Parameter name -> global shape, from the checkpoint's ``.metadata`` (no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(iter_dir)).read_metadata()
    return {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size")}


def _stored_args(iter_dir: Path) -> Any:
    """The training args in the checkpoint's common state (None when there are none)."""
    from megatron.core import dist_checkpointing

    from megatron_mhc.training.cpu import cuda_calls_on_cpu

    with cuda_calls_on_cpu():
        return dist_checkpointing.load_common_state_dict(str(iter_dir)).get("args")


def _rate_from_width(width: int) -> Optional[int]:
    """n from the mapping width n*n + 2n (None if the width is not of that form)."""
    n = math.isqrt(width + 1) - 1
    return n if n >= 1 and n * n + 2 * n == width else None


def read_checkpoint_model(root: Path, iter_dir: Path) -> Optional[CheckpointModel]:
    """What the checkpoint holds, or None when it cannot be read (left to Megatron's loader)."""
    from megatron_mhc.training.checkpoint_io import _LOAD_ERRORS

    try:
        shapes = _parameter_shapes(iter_dir)
        stored = _stored_args(iter_dir)
    except _LOAD_ERRORS:
        return None
    try:
        stored_mhc = mhc_config_from_args(stored) if stored is not None else None
    except (TypeError, ValueError):  # stored values this version refuses: trust the shapes
        stored_mhc = None
    if stored_mhc is not None and stored_mhc.is_residual:
        stored_mhc = None  # one stream, no mHC parameters: a plain model for loading
    widths = [shape[-1] for key, shape in shapes.items()
              if key.endswith(".bias") and any(p in key for p in OUR_PARTS + UPSTREAM_PARTS)]
    if not widths:
        return CheckpointModel(root, iter_dir, None, True)
    upstream = not any(p in key for key in shapes for p in OUR_PARTS)
    rate = _rate_from_width(widths[0])
    if rate is None or rate < 2:
        return None  # not a layout this check knows
    variant = stored_mhc.variant if stored_mhc is not None else "mhc"
    if upstream:
        variant = "mhc"  # the only variant Megatron-LM main implements
    return CheckpointModel(root, iter_dir, MHCConfig(expansion_rate=rate, variant=variant),
                           upstream or stored_mhc is not None, upstream)


def _flags_for(mhc: MHCConfig, variant_known: bool = True) -> str:
    variant = mhc.variant if variant_known else "mhc (or hc)"
    return (f"--enable-mhc {FLAG_NAMES['expansion_rate']} {mhc.n} "
            f"{FLAG_NAMES['variant']} {variant}")


def _wanted(mhc: Optional[MHCConfig]) -> str:
    if mhc is None:
        return "a plain model (no --enable-mhc)"
    if mhc.is_residual:
        return f"a model without mHC parameters (--enable-mhc {FLAG_NAMES['variant']} residual)"
    return f"an mHC model ({_flags_for(mhc)})"


def mismatch_message(held: CheckpointModel, wanted: Optional[MHCConfig]) -> Optional[str]:
    """The error message when ``held`` cannot be loaded into the model the flags ask for
    (``wanted``: the flags' MHCConfig, None without ``--enable-mhc``); None when it can."""
    head = (f"megatron-mhc: the checkpoint {held.root} ({held.iter_dir.name}) holds "
            f"{held.describe()}, but the flags ask for {_wanted(wanted)}: ")
    if held.upstream:
        return head + (
            f"convert it first with `megatron-mhc convert from-upstream {held.root} OUT`, then "
            f"load OUT with {_flags_for(held.mhc)} (and --no-load-optim --no-load-rng)")
    # --mhc-variant residual builds one stream without mHC parameters: a plain model's.
    plain_wanted = wanted is None or wanted.is_residual
    if held.mhc is None:
        if plain_wanted:
            return None
        return head + (
            f"convert it first with `megatron-mhc convert plain-to-mhc {held.root} OUT "
            f"--expansion-rate {wanted.n} --variant {wanted.variant}` and load OUT (with "
            "--no-load-optim --no-load-rng: the conversion keeps only the model weights), or "
            "drop --enable-mhc to continue it as a plain model")
    if wanted is None:
        return head + (
            f"add {_flags_for(held.mhc, held.variant_known)} to continue it (without them "
            "Megatron would load it silently, dropping every mHC parameter)")
    if held.mhc.n != wanted.n or (held.variant_known and held.mhc.variant != wanted.variant):
        if held.variant_known:
            variant = held.mhc.variant
        else:  # mhc and hc have the same parameters
            variant = "mhc (or hc: its args do not say)" if plain_wanted else wanted.variant
        return head + (
            f"use {FLAG_NAMES['expansion_rate']} {held.mhc.n} {FLAG_NAMES['variant']} {variant} "
            "to continue it (another expansion rate or variant is another model; the "
            "conversion tool only adds mHC to plain checkpoints)")
    return None


def check_checkpoint_matches_flags(args: Any, wanted: Optional[MHCConfig]) -> None:
    """Raise ``ValueError`` when the checkpoint ``args`` would load does not hold the model the
    flags ask for (``wanted``: their MHCConfig, None without ``--enable-mhc``)."""
    found = checkpoint_dir_to_load(args)
    if found is None:
        return
    held = read_checkpoint_model(*found)
    if held is None:
        return
    message = mismatch_message(held, wanted)
    if message is not None:
        raise ValueError(message)
