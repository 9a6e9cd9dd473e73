"""Bad input and faults, one table: case -> the expected error (or outcome).

Every case runs in a fresh workspace holding its inputs (small checkpoints, a Megatron-like tree,
token files). After each case the harness checks that the inputs are byte-identical and that
nothing else was written (no output folder, no temporary left behind) unless the case's outcome
names what it writes. Flag cases also check that the parsed arguments were not changed.
"""

import argparse
import copy
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
import torch
from fixtures.checkpoints import cpu_megatron, save_mhc_checkpoint, save_plain_checkpoint

from megatron_mhc import MHCConfig
from megatron_mhc.core.ops import reference
from megatron_mhc.tools.cli import main as cli
from megatron_mhc.training import hooks
from megatron_mhc.training.patching import PatchError, PatchSet


# ------------------------------------------------------------------------------------ harness
@dataclass
class Case:
    """One row: ``run(ws)`` must raise ``error`` matching ``match`` (or exit the CLI with
    ``exit_code`` printing ``match``), or, with ``outcome``, return normally and pass it."""

    name: str
    run: Callable
    error: Optional[type] = None
    match: str = ""
    exit_code: Optional[int] = None
    outcome: Optional[Callable] = None
    writes: Sequence[str] = ()  # workspace entries an outcome case may create or change
    damage: Sequence[tuple] = ()  # (file, how) applied to the workspace's copy before the run


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": "dir" for p in sorted(root.rglob("*")) if p.is_dir()}


class Workspace:
    """The case's inputs, copied from the module's originals."""

    def __init__(self, root: Path, originals: Path):
        self.root = root
        shutil.copytree(originals, root, dirs_exist_ok=True)

    def __truediv__(self, name):
        return self.root / name


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Inputs every case copies: plain / mHC / hc / upstream checkpoints, a patchable tree."""
    from megatron_mhc.tools.convert import convert

    root = tmp_path_factory.mktemp("originals")
    with cpu_megatron():
        save_plain_checkpoint(root / "plain")
        convert("plain-to-mhc", root / "plain", root / "mhc")
        convert("plain-to-mhc", root / "plain", root / "hc",
                mhc_config=MHCConfig(variant="hc", init_method="function_preserving"))
        convert("to-upstream", root / "mhc", root / "upstream")
        save_mhc_checkpoint(root / "trained", MHCConfig(kernel_backend="torch"))
        _with_plain_args(root / "mhc", root / "mhc_plain_args")
    torch.save(torch.randint(0, 256, (2, 3, 4)), root / "batch_3d.pt")
    (root / "not_a_checkpoint").mkdir()
    (root / "not_a_checkpoint" / "readme.txt").write_text("hello\n")
    (root / "a_file.txt").write_text("x\n")
    legacy = root / "legacy" / "mp_rank_00"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_bytes(b"legacy")
    (root / "gains_bad.jsonl").write_text('{"iteration": 1}\nnot json\n')
    _write_patch_tree(root)
    return root


def _with_plain_args(source: Path, out: Path) -> None:
    """A copy of an mHC checkpoint whose stored args are a plain run's (only its parameter names
    tell that it holds mHC)."""
    from megatron_mhc.training.checkpoint_io import read_model_checkpoint, write_model_checkpoint

    checkpoint = read_model_checkpoint(source)
    checkpoint.common["args"] = argparse.Namespace(hidden_size=32, num_layers=2)
    write_model_checkpoint(checkpoint, out)


# A synthetic patch set over a synthetic Megatron-like tree (same format as patches/core_v0.19.0).
PRISTINE = {"pretrain_gpt.py": "print('train')\n",
            "megatron/core/package_info.py": "MAJOR = 0\nMINOR = 19\nPATCH = 1\n",
            "a.py": "".join(f"line {i}\n" for i in range(30))}
PATCHED = {"a.py": PRISTINE["a.py"].replace("line 3\n", "line 3\nhook()  # megatron-mhc\n")}


def _write_patch_tree(root: Path) -> None:
    import difflib
    import json

    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()
    patchset = root / "patchset"
    patchset.mkdir()
    diff = "diff --git a/a.py b/a.py\n" + "".join(difflib.unified_diff(
        PRISTINE["a.py"].splitlines(True), PATCHED["a.py"].splitlines(True), "a/a.py", "b/a.py"))
    (patchset / "megatron-mhc.patch").write_text(diff)
    (patchset / "pin.json").write_text(json.dumps({"tag": "core_v0.19.0", "commit": "0" * 40,
        "files": {"a.py": {"pristine_sha256": sha(PRISTINE["a.py"]),
                           "patched_sha256": sha(PATCHED["a.py"])}}}))
    for name, text in PRISTINE.items():
        (root / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "tree" / name).write_text(text)


def _patches(ws) -> PatchSet:
    return PatchSet(ws / "patchset")


# ------------------------------------------------------------------------------------ actions
def convert_cli(kind, source, out, *options):
    return lambda ws: cli(["convert", kind, str(ws / source), str(ws / out), *options])


CONVERT_PLAIN = convert_cli("plain-to-mhc", "plain", "out")


def gain_cli(*args):
    return lambda ws: cli(["gain-report", *[a if a.startswith("-") else str(ws / a)
                                            for a in args]])


def apply_damage(ws, path: str, how: str) -> None:
    """Damage one file of the workspace's copy (the case's input is the damaged copy)."""
    target = ws / path
    if how == "delete":
        target.unlink()
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    elif how == "scramble":
        data = bytearray(target.read_bytes())
        data[:64] = bytes(b ^ 0xFF for b in data[:64])
        target.write_bytes(bytes(data))
    else:
        target.write_text(how)


SHARD = "plain/iter_0000007/__0_0.distcp"
MHC_SHARD = "mhc/iter_0000007/__0_0.distcp"
TRACKER = "plain/latest_checkpointed_iteration.txt"
VERSION_FILE, V020 = "tree/megatron/core/package_info.py", "MAJOR = 0\nMINOR = 20\nPATCH = 0\n"


def apply_patch(ws):
    return _patches(ws).apply(ws / "tree")


def flags(*argv):
    """Parse the flags the way Megatron's patched parser does, then validate them; the case
    fails if validation changed the parsed arguments. ``{ws}`` in a flag is the workspace."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse's own message, so a case can match the flag
            raise ValueError(f"argparse refused the command line: {message}")

    def run(ws):
        parser = hooks.add_mhc_args(Parser())
        parser.add_argument("--load", default=None)
        parser.add_argument("--pretrained-checkpoint", default=None)
        parser.add_argument("--ckpt-step", type=int, default=None)
        for flag in ("--use-checkpoint-args", "--finetune", "--no-load-optim", "--no-load-rng"):
            parser.add_argument(flag, action="store_true")
        parser.add_argument("--cuda-graph-impl", default="none")
        parser.add_argument("--mtp-num-layers", type=int, default=None)
        parser.add_argument("--hybrid-layer-pattern", default=None)
        parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
        parser.add_argument("--no-overlap-p2p-communication", action="store_false",
                            dest="overlap_p2p_comm")
        args = parser.parse_args([a.replace("{ws}", str(ws.root)) for a in argv])
        before = copy.deepcopy(vars(args))
        try:
            hooks.validate_mhc_args(args)
        finally:
            assert vars(args) == before, "validate_mhc_args changed the arguments on error"
    return run


def passes(result, ws):
    """A flag case that validation accepts."""
    assert result is None


def read_only_parent(ws):
    """A folder without write permission (root ignores permission bits: there os.access is made
    to answer as it would for another user)."""
    target = ws / "ro"
    target.mkdir()
    target.chmod(0o555)
    real_access = os.access
    try:
        if os.geteuid() == 0:
            os.access = lambda path, mode, **kw: (False if Path(path) == target and mode & os.W_OK
                                                  else real_access(path, mode, **kw))
        code = cli(["convert", "plain-to-mhc", str(ws / "plain"), str(target / "out")])
        assert list(target.iterdir()) == [], "something was written into the read-only folder"
        return code
    finally:
        os.access = real_access
        target.chmod(0o755)


def disk_full_while_writing(ws):
    """The checkpoint writer fails midway (ENOSPC): no output, no temporary folder."""
    import errno

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def failing_save(state, directory, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    dist_checkpointing.save = failing_save
    try:
        return cli(["convert", "plain-to-mhc", str(ws / "plain"), str(ws / "out")])
    finally:
        dist_checkpointing.save = real_save


def killed_convert(ws):
    """Start a convert as a separate process, kill it (SIGKILL) once its temporary folder exists:
    the output is complete or absent; a second convert cleans up and completes. (Up to three tries
    in case a convert finishes between two looks.)"""
    # A fresh process as a user starts it: no interpreter, no rendezvous of this test process.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MASTER_PORT", "MASTER_ADDR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    for _ in range(3):
        shutil.rmtree(ws / "out", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "megatron_mhc", "convert", "plain-to-mhc",
                                 str(ws / "plain"), str(ws / "out")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.startswith(".out.tmp-") for p in ws.root.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            # 20 ms: the temporary folder lived 2.3-2.5 s of an 8 s convert (3 runs polled every
            # 1 ms on the 2-core machine while the suite ran); a tighter busy loop would only take
            # CPU from the convert being watched.
            time.sleep(0.02)
        proc.wait(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        if killed:
            break
    left = sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".out."))
    output_after_kill = (ws / "out").exists()
    if output_after_kill:  # killed after the rename: then the output must be complete
        assert (ws / "out" / "iter_0000007" / "metadata.json").is_file()
        shutil.rmtree(ws / "out")
    assert cli(["convert", "plain-to-mhc", str(ws / "plain"), str(ws / "out")]) == 0
    return killed, left


def outcome_killed(result, ws):
    killed, left_by_kill = result
    assert killed, "the convert finished before it could be killed"
    assert left_by_kill, "the killed convert left no temporary folder (killed too early?)"
    assert not [p for p in ws.root.iterdir() if p.name.startswith(".out.")]  # cleaned up
    assert (ws / "out" / "iter_0000007" / "metadata.json").is_file()


def stale_temporary(ws):
    """A temporary folder of a writer that no longer runs (a dead PID) is removed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws / f".out.tmp-{dead.pid}" / "iter_0000007").mkdir(parents=True)
    return cli(["convert", "plain-to-mhc", str(ws / "plain"), str(ws / "out")])


def sinkhorn_of(values):
    def run(ws):
        logits = torch.tensor(values, dtype=torch.float64)
        before = logits.clone()
        out = reference.sinkhorn(logits, 20)
        assert torch.equal(logits, before) or torch.isnan(before).any()
        return out
    return run


def doubly_stochastic(out, ws):
    """Finite, entries in [0, 1], columns summing to 1 (Sinkhorn's last step); rows only
    approximately after 20 iterations when an entry is forced to 0 or 1 (docs/design.md: Sinkhorn)."""
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    torch.testing.assert_close(out.sum(-2), torch.ones_like(out.sum(-2)), atol=1e-9, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)), atol=0.05, rtol=0)


def nan_stays_in_its_token(out, ws):
    assert torch.isnan(out[0]).all()  # never hidden
    assert torch.isfinite(out[1]).all()  # the other token is untouched by it


def gain_metrics_with_non_finite(ws):
    """The training-log gains of a step whose second sublayer produced NaN mappings."""
    from megatron_mhc.training import metrics

    class Armed:  # what collect_gains reads of a HyperConnection (not under CUDA graphs)
        snapshot_h_res = False

        def __init__(self, index, h):
            self.sublayer_index, self.recorded_h_res = index, [h]

    good = torch.eye(4).expand(3, 4, 4).clone()
    bad = good.clone()
    bad[1, 2, 2] = float("nan")
    metrics._ARMED[:] = [Armed(0, good), Armed(1, bad)]
    try:
        return metrics.collect_gains(num_sublayers=2)
    finally:
        metrics._ARMED.clear()


def reports_sublayer(gains, ws):
    assert gains["non_finite_sublayers"] == [1]
    assert all(v == v for v in gains["layer_forward"])  # no NaN logged as a gain


def demo_cli(*argv):
    """The demo's command line; an argument starting with ``ws:`` names a path in the case's
    workspace (never a path of the machine running the tests)."""
    def run(ws):
        from megatron_mhc.tools.demo import main

        with pytest.raises(SystemExit) as exc:
            main([str(ws / a[3:]) if a.startswith("ws:") else a for a in argv])
        return exc.value.code
    return run


def returns(code):
    def check(result, ws):
        assert result == code
    return check


# ------------------------------------------------------------------------------------ the table
CASES = [
    # The patch set.
    Case("patch: wrong Megatron version and edited file", apply_patch, PatchError,
         r"Megatron-Core 0\.20\.0.*a\.py \(foreign\)",
         damage=[(VERSION_FILE, V020), ("tree/a.py", PRISTINE["a.py"].replace("line 3\n", "l3\n"))]),
    Case("patch: 0.20 tree whose hunks still match", apply_patch, PatchError,
         r"accepted only in a Megatron-Core 0\.19\.x tree",
         damage=[(VERSION_FILE, V020), ("tree/a.py", "# new header\n" + PRISTINE["a.py"])]),
    Case("patch: edited inside a hunk", apply_patch, PatchError, r"a\.py \(foreign\)",
         damage=[("tree/a.py", PRISTINE["a.py"].replace("line 4\n", "line 4 (mine)\n"))]),
    Case("patch: applied twice", lambda ws: (_patches(ws).apply(ws / "tree"),
                                             _patches(ws).apply(ws / "tree"))[1],
         outcome=lambda r, ws: ("already applied" in r
                                and (ws / "tree/a.py").read_text() == PATCHED["a.py"]),
         writes=["tree/a.py"]),
    Case("patch: revert when not applied", lambda ws: _patches(ws).revert(ws / "tree"),
         outcome=lambda r, ws: "not applied, nothing changed" in r),
    Case("patch: revert of a partially patched tree", lambda ws: _patches(ws).revert(ws / "tree"),
         PatchError, r"a\.py \(foreign\)",
         damage=[("tree/a.py", PATCHED["a.py"].replace("line 2\n", "line two\n"))]),
    Case("patch: not a Megatron-LM tree", lambda ws: _patches(ws).apply(ws / "not_a_checkpoint"),
         PatchError, "not a Megatron-LM checkout"),
    Case("patch CLI: folder does not exist", lambda ws: cli(["patch", "check", str(ws / "nope")]),
         exit_code=2, match="is not a directory"),
    Case("patch CLI: unknown action", lambda ws: cli(["patch", "bogus", str(ws / "tree")]),
         exit_code=2, match="usage: megatron-mhc patch apply|check|revert"),
    # Checkpoint conversion.
    Case("convert: into an existing folder", convert_cli("plain-to-mhc", "plain", "mhc"),
         exit_code=2, match="exists; pass --overwrite"),
    Case("convert: into the source", convert_cli("plain-to-mhc", "plain", "plain"),
         exit_code=2, match="overlaps the input"),
    Case("convert: into a folder inside the source",
         lambda ws: cli(["convert", "plain-to-mhc", str(ws / "plain"), str(ws / "plain" / "x")]),
         exit_code=2, match="overlaps the input"),
    Case("convert: not a checkpoint", convert_cli("plain-to-mhc", "not_a_checkpoint", "out"),
         exit_code=2, match="not a Megatron torch_dist checkpoint"),
    Case("convert: a file", convert_cli("plain-to-mhc", "a_file.txt", "out"),
         exit_code=2, match="is a file, not a Megatron torch_dist checkpoint folder"),
    Case("convert: a missing path", convert_cli("plain-to-mhc", "nowhere", "out"),
         exit_code=2, match="nowhere does not exist"),
    Case("convert: legacy torch format", convert_cli("plain-to-mhc", "legacy", "out"),
         exit_code=2, match="legacy --ckpt-format torch checkpoint"),
    Case("convert: plain-to-mhc of an mHC checkpoint", convert_cli("plain-to-mhc", "mhc", "out"),
         exit_code=2, match="already has mHC parameters"),
    Case("convert: to-upstream of a plain checkpoint", convert_cli("to-upstream", "plain", "out"),
         exit_code=2, match="not a megatron-mhc checkpoint"),
    Case("convert: from-upstream of ours", convert_cli("from-upstream", "mhc", "out"),
         exit_code=2, match="not an upstream mHC checkpoint"),
    Case("convert: to-upstream of the hc variant", convert_cli("to-upstream", "hc", "out"),
         exit_code=2, match="no upstream equivalent"),
    Case("convert: --expansion-rate 1", convert_cli("plain-to-mhc", "plain", "out",
                                                    "--expansion-rate", "1"),
         exit_code=2, match=r"--mhc-expansion-rate.*2\.\.16"),
    Case("convert: truncated shard", CONVERT_PLAIN, exit_code=2,
         match=r"plain/iter_0000007/__0_0\.distcp is truncated", damage=[(SHARD, "truncate")]),
    Case("convert: missing shard", CONVERT_PLAIN, exit_code=2,
         match=r"__0_0\.distcp is missing", damage=[(SHARD, "delete")]),
    Case("convert: corrupted shard", CONVERT_PLAIN, exit_code=2,
         match=r"checkpoint .*plain: cannot load .*__0_0\.distcp \(UnpicklingError",
         damage=[(SHARD, "scramble")]),
    Case("convert: corrupted .metadata", CONVERT_PLAIN, exit_code=2,
         match=r"cannot read .*iter_0000007/\.metadata",
         damage=[("plain/iter_0000007/.metadata", "truncate")]),
    Case("convert: tracker names a missing iteration", CONVERT_PLAIN, exit_code=2,
         match="names iter_0000009", damage=[(TRACKER, "9")]),
    Case("convert: tracker holds garbage", CONVERT_PLAIN, exit_code=2,
         match="expected an iteration number or 'release'", damage=[(TRACKER, "seven")]),
    Case("convert: read-only output location", read_only_parent, exit_code=2,
         match="is not writable", writes=["ro/"]),  # the case makes the (empty) folder
    Case("convert: disk full while writing", disk_full_while_writing, exit_code=2,
         match="cannot write .*out: .*No space left on device"),
    Case("convert: killed midway, then run again", killed_convert, outcome=outcome_killed,
         writes=["out"]),
    Case("convert: temporary folder of a dead writer", stale_temporary,
         outcome=lambda r, ws: r == 0 and not list(ws.root.glob(".out.*")), writes=["out"]),
    Case("convert: --overwrite replaces the output whole",
         lambda ws: cli(["convert", "to-upstream", str(ws / "mhc"), str(ws / "hc"),
                         "--overwrite"]),
         outcome=lambda r, ws: r == 0 and not list(ws.root.glob(".hc.*")), writes=["hc"]),
    # The gain report.
    Case("gain-report: truncated shard", gain_cli("mhc", "--out", "report"), exit_code=2,
         match=r"__0_0\.distcp is truncated", damage=[(MHC_SHARD, "truncate")]),
    Case("gain-report: plain checkpoint", gain_cli("plain", "--out", "report"),
         exit_code=2, match="no mHC parameters"),
    Case("gain-report: --batch of the wrong shape",
         gain_cli("trained", "--batch", "batch_3d.pt", "--out", "report"),
         exit_code=2, match=r"expected token ids \[b, s\]"),
    Case("gain-report: --log that is not a gain log",
         gain_cli("--log", "gains_bad.jsonl", "--out", "report"),
         exit_code=2, match=r"gains_bad\.jsonl:1: not a gain record"),
    # Flags and config.
    Case("flag: --mhc-* without --enable-mhc", flags("--mhc-expansion-rate", "4"),
         ValueError, "--mhc-expansion-rate given without --enable-mhc"),
    Case("flag: --mhc-expansion-rate 1", flags("--enable-mhc", "--mhc-expansion-rate", "1"),
         ValueError, r"--mhc-expansion-rate\) is invalid; allowed: an integer in 2\.\.16"),
    Case("flag: --mhc-expansion-rate 17", flags("--enable-mhc", "--mhc-expansion-rate", "17"),
         ValueError, r"2\.\.16"),
    Case("flag: --mhc-sinkhorn-iters 0", flags("--enable-mhc", "--mhc-sinkhorn-iters", "0"),
         ValueError, r"--mhc-sinkhorn-iters\) is invalid; allowed: an integer in 1\.\.1000"),
    Case("flag: --mhc-gate-init -1", flags("--enable-mhc", "--mhc-gate-init", "-1"),
         ValueError, "--mhc-gate-init"),
    Case("flag: --mhc-gate-init nan", flags("--enable-mhc", "--mhc-gate-init", "nan"),
         ValueError, "a finite float >= 0"),
    Case("flag: --mhc-res-init-logit 31", flags("--enable-mhc", "--mhc-res-init-logit", "31"),
         ValueError, r"a float in \[0, 30\]"),
    Case("flag: --mhc-norm-eps 0", flags("--enable-mhc", "--mhc-norm-eps", "0"),
         ValueError, r"a float in \(0, 1\)"),
    Case("flag: --mhc-variant unknown", flags("--enable-mhc", "--mhc-variant", "dense"),
         ValueError, r"argparse refused the command line: argument --mhc-variant: invalid "
                     r"choice: 'dense' \(choose from 'mhc', 'hc', 'residual'\)"),
    Case("flag: --mhc-recompute-block 0", flags("--enable-mhc", "--mhc-recompute-block", "0"),
         ValueError, r"argparse refused the command line: argument --mhc-recompute-block: "
                     r"--mhc-recompute-block '0': allowed 'auto' or a positive integer"),
    Case("flag: --mhc-recompute-rebuild sublayer without --mhc-recompute-block",
         flags("--enable-mhc", "--mhc-recompute-rebuild", "sublayer"),
         ValueError, r"--mhc-recompute-rebuild\) is invalid; allowed: 'auto' unless "
                     r"--mhc-recompute-block is set"),
    Case("flag: --mhc-log-interval -1", flags("--enable-mhc", "--mhc-log-interval", "-1"),
         ValueError, "--mhc-log-interval -1: allowed 0"),
    Case("flag: hybrid pattern with Mamba", flags("--enable-mhc", "--hybrid-layer-pattern", "M*-"),
         ValueError, r"'M' \(Mamba\)"),
    Case("flag: --mhc-overlap without p2p overlap (VPP)",
         flags("--enable-mhc", "--mhc-overlap", "--virtual-pipeline-model-parallel-size", "2",
               "--no-overlap-p2p-communication"), ValueError, "--no-overlap-p2p-communication"),
    # Checkpoints that do not match the flags (--load / --pretrained-checkpoint; read, not changed).
    Case("checkpoint: plain loaded with --enable-mhc", flags("--load", "{ws}/plain", "--enable-mhc"),
         ValueError, r"checkpoint \S*/plain \(iter_0000007\) holds a model without mHC parameters"
                     r".*`megatron-mhc convert plain-to-mhc \S*/plain OUT --expansion-rate 4 "
                     r"--variant mhc` and load OUT \(with --no-load-optim --no-load-rng"),
    Case("checkpoint: plain as --pretrained-checkpoint with --enable-mhc (--finetune, "
         "--use-checkpoint-args)",
         flags("--load", "{ws}/not_a_checkpoint", "--pretrained-checkpoint", "{ws}/plain",
               "--finetune", "--no-load-optim", "--use-checkpoint-args", "--enable-mhc",
               "--mhc-expansion-rate", "2", "--mhc-variant", "hc"),
         ValueError, r"\S*/plain \(iter_0000007\).*convert plain-to-mhc \S*/plain OUT "
                     r"--expansion-rate 2 --variant hc"),
    Case("checkpoint: mHC with another --mhc-expansion-rate",
         flags("--load", "{ws}/mhc", "--enable-mhc", "--mhc-expansion-rate", "2"), ValueError,
         r"checkpoint \S*/mhc \(iter_0000007\) holds an mHC model \(n=4, variant mhc\), but "
         r"the flags ask for an mHC model \(--enable-mhc --mhc-expansion-rate 2 --mhc-variant "
         r"mhc\): use --mhc-expansion-rate 4 --mhc-variant mhc"),
    Case("checkpoint: hc variant loaded as mhc (same shapes)", flags("--load", "{ws}/hc",
                                                                     "--enable-mhc"),
         ValueError, r"\S*/hc \(iter_0000007\) holds an mHC model \(n=4, variant hc\).*use "
                     r"--mhc-expansion-rate 4 --mhc-variant hc"),
    Case("checkpoint: mHC loaded without --enable-mhc", flags("--load", "{ws}/trained"),
         ValueError, r"\S*/trained \(iter_0000001\) holds an mHC model \(n=4, variant mhc\)"
                     r".*add --enable-mhc --mhc-expansion-rate 4 --mhc-variant mhc"),
    Case("checkpoint: mHC parameters under a plain run's stored args, without --enable-mhc",
         flags("--load", "{ws}/mhc_plain_args"), ValueError,
         r"\S*/mhc_plain_args \(iter_0000007\) holds an mHC model \(n=4.*add --enable-mhc "
         r"--mhc-expansion-rate 4 --mhc-variant mhc \(or hc\)"),
    Case("checkpoint: Megatron-LM main's layout with --enable-mhc",
         flags("--load", "{ws}/upstream", "--enable-mhc"), ValueError,
         r"\S*/upstream \(iter_0000007\) holds an mHC model in Megatron-LM main's "
         r"HyperConnectionModule layout.*`megatron-mhc convert from-upstream \S*/upstream OUT`"),
    Case("checkpoint: --ckpt-step names an mHC iteration (no tracker), without --enable-mhc",
         flags("--load", "{ws}/mhc", "--ckpt-step", "7"), ValueError,
         r"\S*/mhc \(iter_0000007\) holds an mHC model",
         damage=[("mhc/latest_checkpointed_iteration.txt", "delete")]),
    Case("checkpoint: matching mHC flags", flags("--load", "{ws}/trained", "--enable-mhc",
                                                 "--mhc-expansion-rate", "4"), outcome=passes),
    Case("checkpoint: hc with --mhc-variant hc, optimizer not loaded",
         flags("--load", "{ws}/hc", "--enable-mhc", "--mhc-variant", "hc", "--no-load-optim"),
         outcome=passes),
    Case("checkpoint: plain with plain flags", flags("--load", "{ws}/plain"), outcome=passes),
    Case("checkpoint: plain with --mhc-variant residual (no mHC parameters)",
         flags("--load", "{ws}/plain", "--enable-mhc", "--mhc-variant", "residual"),
         outcome=passes),
    Case("checkpoint: none yet (a fresh run)",
         flags("--load", "{ws}/not_a_checkpoint", "--enable-mhc", "--mhc-expansion-rate", "2"),
         outcome=passes),
    Case("checkpoint: --load that does not exist yet", flags("--load", "{ws}/later"),
         outcome=passes),
    Case("config: kernel backend unknown", lambda ws: MHCConfig(kernel_backend="cuda"),
         ValueError, r"--mhc-kernel-backend\) is invalid; allowed: auto, torch, triton"),
    Case("demo: unknown variant", demo_cli("--variants", "mhc,foo"), outcome=returns(2)),
    Case("demo: --steps 0", demo_cli("--steps", "0"), outcome=returns(2)),
    Case("demo: --out is a file", demo_cli("--out", "ws:a_file.txt"), outcome=returns(2)),
    # Non-finite numbers.
    Case("sinkhorn: +inf logit", sinkhorn_of([[[float("inf"), 0.0], [0.0, 0.0]]]),
         outcome=doubly_stochastic),
    Case("sinkhorn: -inf logits", sinkhorn_of([[[float("-inf"), 0.0], [0.0, float("-inf")]]]),
         outcome=doubly_stochastic),
    Case("sinkhorn: NaN logit", sinkhorn_of([[[float("nan"), 0.0], [0.0, 0.0]],
                                             [[1.0, 0.0], [0.0, 1.0]]]),
         outcome=nan_stays_in_its_token),
    Case("metrics: non-finite H_res in training", gain_metrics_with_non_finite,
         outcome=reports_sublayer),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, originals, tmp_path, capsys):
    ws = Workspace(tmp_path / "ws", originals)
    for path, how in case.damage:
        apply_damage(ws, path, how)
    before = _digest(ws.root)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            case.run(ws)
    elif case.exit_code is not None:
        assert case.run(ws) == case.exit_code
        assert re.search(case.match, capsys.readouterr().err), case.match
    else:
        result = case.run(ws)
        assert case.outcome(result, ws) is not False
    after = _digest(ws.root)
    allowed = tuple(case.writes)
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k) and not k.startswith(allowed))
    assert changed == [], f"{case.name}: changed or left behind {changed}"


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30
