"""Every ``megatron-mhc`` command as a user runs it: a separate process on a machine without a GPU
(``CUDA_VISIBLE_DEVICES=``), no test fixture, no Triton interpreter, started outside the tree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_mhc
from megatron_mhc import MHCConfig

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
COMMAND = [str(BIN / "megatron-mhc")] if (BIN / "megatron-mhc").is_file() else [
    sys.executable, "-m", "megatron_mhc"]


def run(*args, cwd, timeout=600, command=None):
    """Run ``megatron-mhc ARGS`` (or ``command``) as a fresh process, as a user would."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTHONPATH", "MASTER_PORT", "MASTER_ADDR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([*(command or COMMAND), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A plain checkpoint and an mHC checkpoint with training args, written once."""
    from fixtures.checkpoints import cpu_megatron, save_mhc_checkpoint, save_plain_checkpoint

    root = tmp_path_factory.mktemp("cli")
    with cpu_megatron():
        save_plain_checkpoint(root / "plain")
        save_mhc_checkpoint(root / "trained_mhc", MHCConfig(expansion_rate=4,
                                                             kernel_backend="torch"))
    torch.save(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)),
               root / "batch.pt")
    return root


def test_version_help_and_info(tmp_path):
    for command in (COMMAND, [sys.executable, "-m", "megatron_mhc"]):
        result = run("--version", cwd=tmp_path, command=command)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"megatron-mhc {megatron_mhc.__version__}"
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "gain-report" in result.stdout
    result = run("info", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CUDA device: none" in result.stdout and "auto resolves to: torch" in result.stdout
    assert ("cross-sublayer fusion   off (MHC_CROSS_SUBLAYER_FUSION); its CUDA merge + projection "
            "kernel: unavailable: no CUDA device") in result.stdout
    assert "dx-once backward        off (MHC_BACKWARD_DX_ONCE" in result.stdout
    result = run("frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "allowed: info, demo" in result.stderr


def test_patch_commands_on_a_scratch_folder(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("not megatron\n")
    result = run("patch", "check", scratch, cwd=tmp_path)
    assert result.returncode == 2 and "missing" in result.stdout  # conflicting: no target files
    result = run("patch", "apply", scratch, cwd=tmp_path)
    assert result.returncode == 3 and "not a Megatron-LM checkout" in result.stderr
    assert sorted(p.name for p in scratch.iterdir()) == ["notes.txt"]


def test_launch_help(tmp_path):
    result = run("launch", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "pretrain_gpt.py" in result.stdout
    result = run("launch", tmp_path / "no_such_script.py", cwd=tmp_path)
    assert result.returncode == 2 and "is not a file" in result.stderr


def test_convert_round_trip_and_gain_reports(checkpoints, tmp_path):
    out = tmp_path / "mhc"
    result = run("convert", "plain-to-mhc", checkpoints / "plain", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "7"
    result = run("convert", "to-upstream", out, tmp_path / "upstream", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run("convert", "from-upstream", tmp_path / "upstream", tmp_path / "back",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for source in (out, tmp_path / "back"):
        result = run("gain-report", source, "--out", tmp_path / f"report_{source.name}",
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        gains = json.loads((tmp_path / f"report_{source.name}" / "gains.json").read_text())
        assert max(gains["composite_forward"]) == pytest.approx(1.0, abs=1e-6)
    result = run("gain-report", checkpoints / "trained_mhc", "--batch", checkpoints / "batch.pt",
                 "--out", tmp_path / "report_batch", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max composite gain" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_demo_writes_the_gain_log_and_gain_report_plots_it(tmp_path):
    result = run("demo", "--steps", "4", "--num-layers", "2", "--hidden-size", "32",
                 "--seq-length", "32", "--micro-batch-size", "2", "--gain-log-interval", "2",
                 "--out", tmp_path / "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| variant | streams |" in result.stdout and "composite gain:" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "demo" / "gains.jsonl").read_text()
               .splitlines()]
    assert {r["variant"] for r in records} == {"hc", "mhc"}
    assert [r["iteration"] for r in records if r["variant"] == "mhc"] == [1, 3, 4]
    result = run("gain-report", "--log", tmp_path / "demo" / "gains.jsonl", "--out",
                 tmp_path / "plots", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hc |" in result.stdout and "mhc |" in result.stdout
    assert (tmp_path / "plots" / "gain_vs_iteration.png").stat().st_size > 0
