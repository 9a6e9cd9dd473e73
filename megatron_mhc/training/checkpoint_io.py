"""The model part of a Megatron ``torch_dist`` checkpoint, read into memory and written back.

Used by the checkpoint tools (``megatron-mhc convert``, ``gain-report``) and by
``model_from_args``. Reading never modifies the checkpoint. Writing is all-or-nothing: the new
checkpoint is built in a temporary sibling folder (``.<name>.tmp-<pid>``) and renamed into place at
the end, so a failed or killed write leaves either the complete output or none; a later write
removes temporary folders that killed writers left behind. A damaged checkpoint (a missing or
truncated shard, an unreadable metadata file) raises one ``CheckpointError`` that names the
checkpoint and the file. Runs on machines without a GPU (``cpu.cuda_calls_on_cpu``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mhc.training.cpu import cuda_calls_on_cpu, free_port

TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: ShardedTensor / ShardedObject keys that are not model state (dropped by the conversions).
NON_MODEL_KEY_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine_state", "common_state")
#: Entries of the common state dict that are not model state.
NON_MODEL_COMMON_KEYS = ("optimizer", "rng_state", "rerun_state_machine", "content_metadata")
try:  # torch.distributed.checkpoint's CheckpointException derives from BaseException
    from torch.distributed.checkpoint.api import CheckpointException as _DCPException
except ImportError:  # pragma: no cover - present in every torch this package supports
    _DCPException = Exception
#: What reading a damaged checkpoint can raise (anything but an interrupt or exit).
_LOAD_ERRORS = (Exception, _DCPException)
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written as asked; the message says which and why."""


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
    iteration directory itself; ``CheckpointError`` for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a Megatron torch_dist checkpoint folder")
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        label = tracker.read_text().strip()
        if label != "release" and not label.isdigit():
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', "
                                  f"found {label[:40]!r}")
        sub = path / ("release" if label == "release" else f"iter_{int(label):07d}")
        if not (sub / "metadata.json").is_file():
            raise CheckpointError(f"{path}: {TRACKER_FILE} names {sub.name}, but {sub} holds no "
                                  "torch_dist checkpoint (no metadata.json)")
        return sub, label
    if (path / "metadata.json").is_file():
        return path, None
    if (path / "mp_rank_00").is_dir() or any(path.glob("mp_rank_*")):
        raise CheckpointError(
            f"{path} is a legacy --ckpt-format torch checkpoint; convert it to torch_dist first "
            "(load it in Megatron with --ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
    raise CheckpointError(
        f"{path} is not a Megatron torch_dist checkpoint (neither {TRACKER_FILE} nor metadata.json)")


def ensure_process_group() -> None:
    """dist-ckpt needs a process group: create a world-size-1 gloo group if there is none."""
    if torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def check_shard_files(iter_dir: Path) -> None:
    """Every shard file the checkpoint's metadata names exists and is long enough.

    Raises ``CheckpointError`` naming the checkpoint and the first missing or truncated file
    (torch.distributed.checkpoint would otherwise fail deep inside a reader thread).
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(iter_dir)).read_metadata()
    except _LOAD_ERRORS as exc:  # a missing / truncated / foreign .metadata file
        raise CheckpointError(f"checkpoint {iter_dir}: cannot read {iter_dir / '.metadata'} "
                              f"({_describe(exc)})") from exc
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = iter_dir / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {iter_dir}: shard file {file} is missing")
        size = file.stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint {iter_dir}: shard file {file} is truncated "
                                  f"({size} bytes, its metadata needs {end})")


def _is_model_key(key: str) -> bool:
    return not key.startswith(NON_MODEL_KEY_PREFIXES)


def _inner_error(exc: BaseException) -> BaseException:
    """The first rank's own exception inside a torch.distributed.checkpoint CheckpointException."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))  # (exception, traceback frames) in torch 2.x
        wrapped = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        inner = getattr(wrapped, "exc", wrapped)
        return inner if isinstance(inner, BaseException) else exc
    return exc


def _describe(exc: BaseException) -> str:
    inner = _inner_error(exc)
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _named_file(iter_dir: Path, exc: BaseException) -> str:
    """The checkpoint file an exception names; else its only shard file; else the folder."""
    found = re.findall(r"[\w.-]+\.(?:distcp|pt|json|metadata)\b", f"{exc} {_inner_error(exc)}")
    if found:
        return str(iter_dir / found[0])
    shards = sorted(iter_dir.glob("*.distcp"))
    if len(shards) == 1:
        return str(shards[0])
    return f"one of the shard files in {iter_dir}" if shards else str(iter_dir)


def read_common_state(path: Path) -> Tuple[Path, Optional[str], dict]:
    """``(iteration dir, tracker content, common state dict)`` of the checkpoint at ``path``, after
    checking that every shard file its metadata names is there and long enough."""
    from megatron.core import dist_checkpointing

    iter_dir, label = locate_checkpoint(path)
    check_shard_files(iter_dir)
    try:
        with cuda_calls_on_cpu():
            common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    except _LOAD_ERRORS as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read its common state "
                              f"{iter_dir / 'common.pt'} ({_describe(exc)})") from exc
    return iter_dir, label, common


def load_sharded(sharded_state_dict: dict, iter_dir: Path, path: Optional[Path] = None) -> dict:
    """``dist_checkpointing.load`` of ``sharded_state_dict`` from ``iter_dir`` (whose shard files
    ``read_common_state`` checked), any failure raised as one ``CheckpointError`` naming the file."""
    from megatron.core import dist_checkpointing

    try:
        with cuda_calls_on_cpu():
            return dist_checkpointing.load(sharded_state_dict, str(iter_dir),
                                           validate_access_integrity=False)
    except _LOAD_ERRORS as exc:  # damaged shard contents
        raise CheckpointError(f"checkpoint {path or iter_dir}: cannot load "
                              f"{_named_file(iter_dir, exc)} ({_describe(exc)})") from exc


def read_model_checkpoint(path: Path) -> ModelCheckpoint:
    """Load every model tensor and object of the checkpoint at ``path`` (never modified)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    ensure_process_group()
    iter_dir, label, common = read_common_state(path)
    try:
        with cuda_calls_on_cpu():
            wanted = {k: v for k, v in load_sharded_metadata(str(iter_dir)).items()
                      if _is_model_key(v.key)}
    except _LOAD_ERRORS as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read its tensor metadata "
                              f"{iter_dir / 'metadata.json'} ({_describe(exc)})") from exc
    loaded = load_sharded(wanted, iter_dir, path)
    tensors, objects = {}, {}  # (load() also returns the common state: keep only ours)
    for unique_key, meta in wanted.items():
        if isinstance(meta, ShardedObject):
            objects[unique_key] = dataclasses.replace(meta, data=loaded[unique_key])
        else:
            tensors[meta.key] = loaded[unique_key]
    content_metadata = common.get("content_metadata")
    common = {k: v for k, v in common.items() if k not in NON_MODEL_COMMON_KEYS}
    return ModelCheckpoint(common, tensors, objects, content_metadata, label)


def remove_stale_temporaries(out: Path) -> List[Path]:
    """Remove ``.<out>.tmp-<pid>`` / ``.<out>.old-<pid>`` siblings whose writer process is gone
    (left by a killed write); returns what was removed."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TMP_NAME.match(entry.name)
        if match is None or match.group("name") != out.name:
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _process_alive(pid):
            continue  # another writer is at work on the same output
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(out: Path, overwrite: bool, source: Optional[Path] = None) -> Path:
    """Refuse an output that exists (unless ``overwrite``), overlaps the source, or cannot be
    written; returns the resolved path. Nothing is created."""
    out = Path(out).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise CheckpointError(f"output {out} overlaps the input {src}: choose another path")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} exists; pass --overwrite to replace it")
    parent = out.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise CheckpointError(f"output {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"output {out}: {existing} is not writable")
    return out


def write_model_checkpoint(
    checkpoint: ModelCheckpoint, out: Path, overwrite: bool = False, source: Optional[Path] = None
) -> Path:
    """Write ``checkpoint`` as a torch_dist checkpoint at ``out`` (root with tracker file when the
    source had one). Refuses an existing ``out`` unless ``overwrite``; all-or-nothing (temporary
    sibling + rename; an overwritten output is kept until the new one is in place)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = check_output_path(out, overwrite, source)
    ensure_process_group()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
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
        with cuda_calls_on_cpu():
            dist_checkpointing.save(
                state, str(iter_dir), content_metadata=checkpoint.content_metadata
            )
        if checkpoint.iteration is not None:
            (tmp / TRACKER_FILE).write_text(str(checkpoint.iteration))
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new output did not land: put the old one back
                os.replace(old, out)
    return out
