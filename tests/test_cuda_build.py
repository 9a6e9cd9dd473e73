"""The CUDA C++ kernels (kernels/cuda/*.cu) compile with nvcc for sm_90 and load through ctypes,
with the C interface the Python wrappers declare. Needs nvcc, not a GPU (those tests skip without
nvcc); the kernels' values are tested on a Hopper GPU (test_cuda_kernels.py,
test_cuda_merge_project.py).
"""

import pytest

from megatron_mhc.kernels.cuda import _build, entry, merge_project

needs_nvcc = pytest.mark.skipif(_build.nvcc_path() is None,
                                reason="nvcc not found (set CUDA_HOME): the .cu files are not built")


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MHC_CUDA_BUILD_DIR", str(tmp_path))
    return tmp_path


@needs_nvcc
def test_merge_project_library_builds_and_names_its_slices(build_dir):
    library = _build.Library(merge_project.LIBRARY.source, "libmhc_merge_project", "test",
                             merge_project._declare)
    lib = library.get()
    assert library.path().parent == build_dir and library.path().is_file()
    assert [lib.mhc_merge_project_slice(n) for n in (2, 4, 8)] == [256, 256, 0]
    assert lib.mhc_merge_project(*([None] * 8), 16, 8, 64, 0, 0, None) == -1  # n = 8 refused
    assert b"n=8 not supported" in lib.mhc_merge_project_last_error()


@needs_nvcc
def test_entry_library_builds(build_dir):
    library = _build.Library(entry.LIBRARY.source, "libmhc_entry", "test", entry._declare)
    library.get()
    assert library.path().is_file()


@needs_nvcc
def test_a_failed_build_names_nvcc_and_is_not_retried(build_dir, tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text("this is not C++\n")
    library = _build.Library(broken, "libbroken", "the broken kernel", lambda lib: None)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the broken kernel unavailable: nvcc failed"):
            library.get()
    assert not library.path().exists()


def test_info_line_says_whether_the_merge_project_kernel_can_run(monkeypatch, tmp_path):
    """``megatron-mhc info``'s line for the CUDA merge + projection kernel, without a build."""
    import torch

    monkeypatch.setattr(merge_project, "ENABLED", "0")
    assert merge_project.status_without_build() == "off (MHC_CUDA_MERGE_PROJECT=0)"
    monkeypatch.setattr(merge_project, "ENABLED", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "needs a Hopper GPU (sm_90), found sm_80" in merge_project.status_without_build()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("MHC_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)
    assert merge_project.status_without_build() == "unavailable: nvcc not found (set CUDA_HOME)"
    monkeypatch.setattr(_build, "nvcc_path", lambda: "/usr/bin/nvcc")
    assert merge_project.status_without_build().startswith("available once built")
    merge_project.LIBRARY.path().write_bytes(b"")
    assert merge_project.status_without_build().startswith("available (built: ")


def test_merge_project_names_what_it_does_not_take():
    """The wrapper declines (the caller then runs Triton) with the reason, before any launch."""
    import torch

    t, n, c = 5, 4, 64
    x = torch.randn(t, n, c).bfloat16()
    phi = torch.randn(n * c, 24).bfloat16()
    y, h_post, h_res = torch.randn(t, c).bfloat16(), torch.rand(t, n), torch.rand(t, n, n)
    reason = merge_project.unsupported_reason
    assert reason(x, phi, y, h_post, h_res) == "x is not on a CUDA device"
    assert reason(x[:, :, :0], phi[:0]).startswith("x shape (5, 4, 0)")
    assert reason(x.float(), phi) == "x dtype torch.float32 (the kernel takes bfloat16 / float16)"
    assert reason(x[:, :3], phi) == "n = 3 streams (the kernel takes 2 or 4)"
    assert reason(x[..., :60], phi) == "C = 60 is not a multiple of 8"
    assert reason(x, phi[:-1]).startswith("next_phi shape (255, 24)")
    assert reason(x, phi, y[:, :32]) == "y shape (5, 32), expected (5, 64)"
    assert reason(x, phi, y, h_post[:4]) == "h_post shape (4, 4), expected (5, 4)"
    assert reason(x, phi, y, h_post, h_res.transpose(0, 2)).startswith("h_res shape (4, 4, 5)")
    assert reason(x, phi, y, h_post, h_res.to("meta")) == "h_res on meta, x on cpu"
    assert merge_project.merge_project_forward(x, y, h_post, h_res, phi) is None

