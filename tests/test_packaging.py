"""The package as users install it: an sdist, a wheel built from that sdist, and the wheel
installed into a fresh virtual environment outside the tree, where the Triton ops import and run
(interpreter) and ``megatron-mhc patch check`` finds the shipped patch set."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import megatron_mhc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(sdist, wheel)`` built by ``python -m build`` (the wheel from the sdist) without network."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=out)
    sdist = next(out.glob("megatron_mhc-*.tar.gz"))
    wheel = next(out.glob("megatron_mhc-*.whl"))
    return sdist, wheel


def test_sdist_and_wheel_hold_kernels_and_patches(built):
    sdist, wheel = built
    version = megatron_mhc.__version__
    assert f"megatron_mhc-{version}" in wheel.name
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for needed in ("kernels/triton/mappings.py", "kernels/tilelang/merge.py",
                   "patches/core_v0.19.0/megatron-mhc.patch",
                   "patches/core_v0.19.0/pin.json", "pyproject.toml", "setup.py"):
        assert any(n.endswith(needed) for n in names), needed
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        entry_points = whl.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for needed in ("megatron_mhc/kernels/triton/__init__.py", "megatron_mhc/kernels/triton/_launch.py",
                   "megatron_mhc/kernels/triton/mappings.py", "megatron_mhc/kernels/tilelang/merge.py",
                   "megatron_mhc/patches/core_v0.19.0/megatron-mhc.patch",
                   "megatron_mhc/patches/core_v0.19.0/pin.json",
                   "megatron_mhc/data/gutenberg_sample.txt.gz", "megatron_mhc/hooks.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "fixtures/", "benchmarks/")) for n in names)
    assert "megatron-mhc = megatron_mhc.tools.cli:main" in entry_points


def test_wheel_in_a_fresh_venv_outside_the_tree(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    # The heavy dependencies (torch, megatron-core, triton) come from this environment's
    # site-packages, appended after the fresh venv's own: megatron_mhc itself only from the wheel.
    site = next((venv / "lib").glob("python3.*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    probe = _run([python, "-c", """
import torch, megatron_mhc
from megatron_mhc.kernels.triton import TRITON_OPS
from megatron_mhc.core.ops import reference
assert "/venv/" in megatron_mhc.__file__, megatron_mhc.__file__
x, y = torch.randn(5, 3, 16), torch.randn(5, 16)
h_post, h_res = torch.rand(5, 3), torch.rand(5, 3, 3)
got = TRITON_OPS.post_res_merge(x, y, h_post, h_res)
want = reference.post_res_merge(x.double(), y.double(), h_post.double(), h_res.double())
assert (got.double() - want).abs().max() < 1e-5
print("ok", megatron_mhc.__version__, megatron_mhc.__file__)
"""], cwd=tmp_path, env=env)
    assert probe.stdout.startswith("ok")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    check = subprocess.run([venv / "bin" / "megatron-mhc", "patch", "check", scratch],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert check.returncode == 2, check.stderr  # conflicting: the scratch folder has no targets
    assert "megatron/core/pipeline_parallel/schedules.py: missing" in check.stdout
    version = _run([venv / "bin" / "megatron-mhc", "--version"], cwd=tmp_path, env=env)
    assert version.stdout.strip() == f"megatron-mhc {megatron_mhc.__version__}"
    # In the repository root the source tree shadows the installed copy: it must still find the
    # kernels and the patch files (beside it, as the wheel has them inside).
    shadow = _run([python, "-c", "import megatron_mhc, megatron_mhc.kernels.triton; "
                   "from megatron_mhc.training.patching import patch_dir; "
                   "print(megatron_mhc.__file__, patch_dir())"], cwd=ROOT, env=env)
    assert shadow.stdout.startswith(str(ROOT / "megatron_mhc")), shadow.stdout
    assert str(ROOT / "patches" / "core_v0.19.0") in shadow.stdout
