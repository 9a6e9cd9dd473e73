"""``megatron-mhc patch apply|check|revert <Megatron-LM dir>``: the hook patch set for the pin.

The patch set (``patches/<tag>/megatron-mhc.patch``, shipped in the package as
``megatron_mhc.patches``) only adds guarded hook lines calling ``megatron_mhc.hooks``. ``pin.json``
next to it holds the SHA-256 of every target file at the pinned tag (pristine) and after the patch
(patched). Each target file of a tree is:

* *pristine* / *patched*: byte-identical to the tag's file / to it with the patch applied;
* *pristine, not pinned* / *patched, not pinned*: another file (e.g. of a later 0.19.x release)
  where every hunk's context and removed lines match exactly, possibly at other line numbers (no
  fuzz) / where the patched lines match so;
* *foreign*: anything else; *missing*.

Commands:

* ``check``: reports ``applied`` / ``not applied`` / ``conflicting`` (exit 0 / 1 / 2).
* ``apply``: refuses unless every file is pristine (pinned or not; unpinned files only in a
  Megatron-Core 0.19.x tree); all new contents are computed in memory first and verified (against
  ``pin.json``, or, for unpinned files, by reverting them back to the original bytes), and a failed
  write restores every file already written, so the tree ends either fully patched or
  byte-identical to before.
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


#: Megatron-Core releases whose files may differ from the pinned tag's but take the hunks.
SUPPORTED_SERIES = "0.19"
STATE_PRISTINE, STATE_PATCHED = "pristine", "patched"
STATE_PRISTINE_UNPINNED, STATE_PATCHED_UNPINNED = "pristine, not pinned", "patched, not pinned"
STATE_FOREIGN, STATE_MISSING = "foreign", "missing"


def patch_dir(tag: str = PIN_TAG) -> Path:
    """Where the patch set for ``tag`` lives: ``megatron_mhc.patches`` (the repository's top-level
    ``patches/`` folder, shipped as package data)."""
    from importlib import resources

    candidate = Path(str(resources.files("megatron_mhc.patches") / tag))
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


def _find_block(source: List[str], block: List[str], nominal: int, lowest: int) -> int:
    """Index of ``block`` in ``source`` at or after ``lowest``, nearest to ``nominal``; -1 if absent."""
    size = len(block)
    for distance in range(len(source) + 1):
        for start in (nominal - distance, nominal + distance) if distance else (nominal,):
            if lowest <= start <= len(source) - size and source[start:start + size] == block:
                return start
        if nominal - distance < lowest and nominal + distance > len(source) - size:
            break
    return -1


def apply_hunks(text: str, hunks: List[Hunk], reverse: bool = False, exact: bool = True) -> str:
    """Apply the hunks to ``text`` without fuzz: every context and removed line must match.

    ``exact``: each hunk at its own line number (the pinned file); otherwise a hunk may sit at
    another line (searched nearest to where the previous hunk's shift puts it), as in a later
    release of the same line. Raises ``PatchError`` on any mismatch."""
    source = text.splitlines(keepends=True)
    out: List[str] = []
    cursor = 0  # index into source
    shift = 0  # how far the previous hunk sat from its own line number
    for hunk in hunks:
        here, there = ("+", "-") if reverse else ("-", "+")
        expected = [t for m, t in hunk.lines if m in (" ", here)]
        replacement = [t for m, t in hunk.lines if m in (" ", there)]
        nominal = (hunk.new_start if reverse else hunk.old_start) - 1
        if exact:
            start = nominal
            if start < cursor or source[start:start + len(expected)] != expected:
                start = -1
        else:
            start = _find_block(source, expected, nominal + shift, cursor)
        if start < 0:
            raise PatchError(f"hunk at line {nominal + 1} does not match")
        shift = start - nominal
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

    def _file_state(self, path: str, data: bytes) -> str:
        digests = self.pin["files"][path]
        digest = _sha256(data)
        if digest == digests["pristine_sha256"]:
            return STATE_PRISTINE
        if digest == digests["patched_sha256"]:
            return STATE_PATCHED
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return STATE_FOREIGN
        for reverse, state in ((False, STATE_PRISTINE_UNPINNED), (True, STATE_PATCHED_UNPINNED)):
            try:
                apply_hunks(text, self.hunks[path], reverse=reverse, exact=False)
            except PatchError:
                continue
            return state
        return STATE_FOREIGN

    def status(self, root: Path) -> TreeStatus:
        """Classify every target file of the tree at ``root``."""
        root = Path(root)
        states = {}
        for path in self.pin["files"]:
            target = root / path
            states[path] = (self._file_state(path, target.read_bytes()) if target.is_file()
                            else STATE_MISSING)
        values = set(states.values())
        if values <= {STATE_PATCHED, STATE_PATCHED_UNPINNED}:
            state = STATE_APPLIED
        elif values <= {STATE_PRISTINE, STATE_PRISTINE_UNPINNED}:
            state = STATE_NOT_APPLIED
        else:
            state = STATE_CONFLICTING
        return TreeStatus(state, states, _tree_version(root))

    def _refusal(self, root: Path, status: TreeStatus, wanted: str, action: str) -> PatchError:
        if not (root / "pretrain_gpt.py").is_file() or status.version is None:
            return PatchError(
                f"{root} is not a Megatron-LM checkout (no pretrain_gpt.py / {PACKAGE_INFO}); "
                f"{action} needs a Megatron-LM tree at tag {self.pin['tag']}")
        accepted = (wanted, f"{wanted}, not pinned")
        bad = [f"{p} ({s})" for p, s in status.files.items() if s not in accepted]
        unpinned = [p for p, s in status.files.items() if s == f"{wanted}, not pinned"]
        if not bad and unpinned:
            return PatchError(
                f"cannot {action} {root}: it found Megatron-Core {status.version}, and files that "
                f"differ from tag {self.pin['tag']} ({', '.join(unpinned)}) are accepted only in "
                f"a Megatron-Core {SUPPORTED_SERIES}.x tree. Check out {self.pin['tag']} or a "
                f"{SUPPORTED_SERIES}.x release.")
        return PatchError(
            f"cannot {action} {root}: it found Megatron-Core {status.version} and files that are "
            f"not {wanted} at tag {self.pin['tag']} (commit {self.pin['commit'][:10]}), nor "
            "files where the hunks match: "
            + ", ".join(bad)
            + f". megatron-mhc supports {self.pin['tag']} and {SUPPORTED_SERIES}.x trees whose "
            f"hunks match: check out {self.pin['tag']} (git checkout {self.pin['tag']}) or "
            "revert local changes to these files.")

    def _acceptable(self, status: TreeStatus, wanted: str) -> bool:
        """Unpinned files are accepted only in a tree of the supported release series."""
        unpinned = any(s == f"{wanted}, not pinned" for s in status.files.values())
        return not unpinned or (status.version or "").startswith(SUPPORTED_SERIES + ".")

    def _rewrite(self, root: Path, reverse: bool) -> None:
        result = "pristine" if reverse else "patched"
        new_contents: Dict[Path, bytes] = {}
        for path, hunks in self.hunks.items():
            target = root / path
            data = target.read_bytes()
            text = data.decode("utf-8")
            pinned = _sha256(data) == self.pin["files"][path][
                f"{'patched' if reverse else 'pristine'}_sha256"]
            new = apply_hunks(text, hunks, reverse=reverse, exact=pinned).encode("utf-8")
            if pinned and _sha256(new) != self.pin["files"][path][f"{result}_sha256"]:
                raise PatchError(f"{path}: result does not match the pinned {result} file")
            if not pinned and apply_hunks(new.decode("utf-8"), hunks, reverse=not reverse,
                                          exact=False).encode("utf-8") != data:
                raise PatchError(f"{path}: the {result} result does not revert to the original")
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
        if status.state != STATE_NOT_APPLIED or not self._acceptable(status, STATE_PRISTINE):
            raise self._refusal(root, status, STATE_PRISTINE, "patch")
        self._rewrite(root, reverse=False)
        return f"{root}: applied the megatron-mhc hooks to {len(self.hunks)} files"

    def revert(self, root: Path) -> str:
        """Revert the patch set (all-or-nothing). Returns a one-line report."""
        root = Path(root)
        status = self.status(root)
        if status.state == STATE_NOT_APPLIED:
            return f"{root}: not applied, nothing changed"
        if status.state != STATE_APPLIED or not self._acceptable(status, STATE_PATCHED):
            raise self._refusal(root, status, STATE_PATCHED, "revert")
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
