"""``megatron-mhc patch apply|check|revert <Megatron-LM dir>``: the hook patch set for the pin.

The patch set (``patches/<tag>/megatron-mhc.patch``, shipped in the package) only adds guarded
hook lines calling ``megatron_mhc.hooks``. ``pin.json`` next to it holds the SHA-256 of every
target file at the pinned tag (pristine) and after the patch (patched), so a tree is recognised
exactly: each file is *pristine*, *patched* or *foreign* (anything else).

* ``check``: reports ``applied`` / ``not applied`` / ``conflicting`` (exit 0 / 1 / 2).
* ``apply``: refuses unless every file is pristine; all new contents are computed and verified
  against ``pin.json`` in memory before the first write, and a failed write restores every file
  already written, so the tree ends either fully patched or byte-identical to before.
* ``revert``: the same in reverse (every file must be patched).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PIN_TAG = "core_v0.19.0"
PATCH_FILE = "megatron-mhc.patch"
PIN_FILE = "pin.json"
PACKAGE_INFO = "megatron/core/package_info.py"

STATE_APPLIED = "applied"
STATE_NOT_APPLIED = "not applied"
STATE_CONFLICTING = "conflicting"


class PatchError(RuntimeError):
    """The tree cannot be patched / reverted as asked; the message says why."""


def patch_dir(tag: str = PIN_TAG) -> Path:
    """Where the patch set for ``tag`` lives (inside the installed package, or the source tree)."""
    candidate = Path(__file__).resolve().parent / "patches" / tag
    if not (candidate / PATCH_FILE).is_file():
        raise PatchError(f"patch set for {tag} not found at {candidate}")
    return candidate


@dataclasses.dataclass
class Hunk:
    """One hunk of a unified diff: old start line (1-based) and its lines with their marks."""

    old_start: int
    new_start: int
    lines: List[Tuple[str, str]]  # (' ' | '-' | '+', text including its newline)


def parse_unified_diff(text: str) -> Dict[str, List[Hunk]]:
    """``{path: [Hunk, ...]}`` from a ``git diff`` (``a/`` and ``b/`` prefixes)."""
    files: Dict[str, List[Hunk]] = {}
    current: Optional[List[Hunk]] = None
    hunk: Optional[Hunk] = None
    for line in text.splitlines(keepends=True):
        if line.startswith("+++ "):
            path = line[4:].strip()
            path = path[2:] if path.startswith("b/") else path
            current = files.setdefault(path, [])
            hunk = None
        elif line.startswith("--- ") or line.startswith("diff ") or line.startswith("index "):
            hunk = None
        elif line.startswith("@@"):
            match = re.match(r"@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@", line)
            if match is None or current is None:
                raise PatchError(f"malformed hunk header: {line.strip()}")
            hunk = Hunk(int(match.group(1)), int(match.group(2)), [])
            current.append(hunk)
        elif hunk is not None and line[:1] in (" ", "-", "+"):
            hunk.lines.append((line[0], line[1:]))
        elif hunk is not None and line.startswith("\\"):
            continue  # "\ No newline at end of file"
    return files


def apply_hunks(text: str, hunks: List[Hunk], reverse: bool = False) -> str:
    """Apply the hunks exactly (no fuzz) to ``text``; raises ``PatchError`` on any mismatch."""
    source = text.splitlines(keepends=True)
    out: List[str] = []
    cursor = 0  # index into source
    for hunk in hunks:
        here, there = ("+", "-") if reverse else ("-", "+")
        expected = [t for m, t in hunk.lines if m in (" ", here)]
        replacement = [t for m, t in hunk.lines if m in (" ", there)]
        start = (hunk.new_start if reverse else hunk.old_start) - 1
        if start < cursor or source[start:start + len(expected)] != expected:
            raise PatchError(f"hunk at line {start + 1} does not match")
        out.extend(source[cursor:start])
        out.extend(replacement)
        cursor = start + len(expected)
    out.extend(source[cursor:])
    return "".join(out)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class TreeStatus:
    """What ``check`` found: the overall state and one state per target file."""

    state: str
    files: Dict[str, str]  # path -> pristine | patched | foreign | missing
    version: Optional[str]

    def describe(self) -> str:
        """A human-readable report."""
        lines = [f"megatron-mhc patch set for {PIN_TAG}: {self.state}"]
        if self.version is not None:
            lines.append(f"  Megatron-Core version in the tree: {self.version}")
        lines += [f"  {path}: {state}" for path, state in self.files.items()]
        return "\n".join(lines)


def _tree_version(root: Path) -> Optional[str]:
    info = root / PACKAGE_INFO
    if not info.is_file():
        return None
    text = info.read_text()
    parts = [re.search(rf"^{name} = (\S+)", text, re.M) for name in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return "unknown"
    return ".".join(p.group(1) for p in parts)


class PatchSet:
    """The patch and the pin of one tag."""

    def __init__(self, directory: Optional[Path] = None):
        directory = Path(directory) if directory is not None else patch_dir()
        self.pin = json.loads((directory / PIN_FILE).read_text())
        self.hunks = parse_unified_diff((directory / PATCH_FILE).read_text())
        if set(self.hunks) != set(self.pin["files"]):
            raise PatchError(f"{directory}: {PATCH_FILE} and {PIN_FILE} name different files")

    def status(self, root: Path) -> TreeStatus:
        """Classify every target file of the tree at ``root``."""
        root = Path(root)
        states = {}
        for path, digests in self.pin["files"].items():
            target = root / path
            if not target.is_file():
                states[path] = "missing"
                continue
            digest = _sha256(target.read_bytes())
            states[path] = (
                "pristine" if digest == digests["pristine_sha256"]
                else "patched" if digest == digests["patched_sha256"]
                else "foreign"
            )
        values = set(states.values())
        if values == {"patched"}:
            state = STATE_APPLIED
        elif values == {"pristine"}:
            state = STATE_NOT_APPLIED
        else:
            state = STATE_CONFLICTING
        return TreeStatus(state, states, _tree_version(root))

    def _refusal(self, root: Path, status: TreeStatus, wanted: str, action: str) -> PatchError:
        if not (root / "pretrain_gpt.py").is_file() or status.version is None:
            return PatchError(
                f"{root} is not a Megatron-LM checkout (no pretrain_gpt.py / {PACKAGE_INFO}); "
                f"{action} needs a Megatron-LM tree at tag {self.pin['tag']}")
        bad = [f"{p} ({s})" for p, s in status.files.items() if s != wanted]
        return PatchError(
            f"cannot {action} {root}: it found Megatron-Core {status.version} and files that are "
            f"not {wanted} at tag {self.pin['tag']} (commit {self.pin['commit'][:10]}): "
            + ", ".join(bad)
            + ". megatron-mhc supports exactly that tag: check it out (git checkout "
            f"{self.pin['tag']}) or revert local changes to these files.")

    def _rewrite(self, root: Path, reverse: bool) -> None:
        result = "pristine" if reverse else "patched"
        new_contents: Dict[Path, bytes] = {}
        for path, hunks in self.hunks.items():
            target = root / path
            text = target.read_bytes().decode("utf-8")
            new = apply_hunks(text, hunks, reverse=reverse).encode("utf-8")
            if _sha256(new) != self.pin["files"][path][f"{result}_sha256"]:
                raise PatchError(f"{path}: result does not match the pinned {result} file")
            new_contents[target] = new
        originals = {target: target.read_bytes() for target in new_contents}
        written: List[Path] = []
        try:
            for target, data in new_contents.items():
                _atomic_write(target, data)
                written.append(target)
        except BaseException:
            for target in written:
                _atomic_write(target, originals[target])
            raise

    def apply(self, root: Path) -> str:
        """Apply the patch set (all-or-nothing). Returns a one-line report."""
        root = Path(root)
        status = self.status(root)
        if status.state == STATE_APPLIED:
            return f"{root}: already applied, nothing changed"
        if status.state != STATE_NOT_APPLIED:
            raise self._refusal(root, status, "pristine", "patch")
        self._rewrite(root, reverse=False)
        return f"{root}: applied the megatron-mhc hooks to {len(self.hunks)} files"

    def revert(self, root: Path) -> str:
        """Revert the patch set (all-or-nothing). Returns a one-line report."""
        root = Path(root)
        status = self.status(root)
        if status.state == STATE_NOT_APPLIED:
            return f"{root}: not applied, nothing changed"
        if status.state != STATE_APPLIED:
            raise self._refusal(root, status, "patched", "revert")
        self._rewrite(root, reverse=True)
        return f"{root}: reverted the megatron-mhc hooks in {len(self.hunks)} files"


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(target.name + ".mhc-tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, target.stat().st_mode & 0o7777)
    os.replace(tmp, target)


EXIT_CODES = {STATE_APPLIED: 0, STATE_NOT_APPLIED: 1, STATE_CONFLICTING: 2}


def main(argv: List[str]) -> int:
    """``megatron-mhc patch apply|check|revert <Megatron-LM dir>``."""
    usage = "usage: megatron-mhc patch apply|check|revert <Megatron-LM dir>"
    if len(argv) != 2 or argv[0] not in ("apply", "check", "revert"):
        print(usage, file=sys.stderr)
        return 2
    action, root = argv[0], Path(argv[1])
    if not root.is_dir():
        print(f"megatron-mhc patch: {root} is not a directory", file=sys.stderr)
        return 2
    patches = PatchSet()
    try:
        if action == "check":
            status = patches.status(root)
            print(status.describe())
            return EXIT_CODES[status.state]
        print(patches.apply(root) if action == "apply" else patches.revert(root))
        return 0
    except PatchError as exc:
        print(f"megatron-mhc patch {action}: {exc}", file=sys.stderr)
        return 3
