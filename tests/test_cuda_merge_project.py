"""The CUDA merge + projection kernel (kernels/cuda/merge_project.cu) against the float64
reference: the merged stream, and every channel slice's projection and sum-of-squares partials.

GPU-only (a Hopper GPU); skipped elsewhere. Inputs are fresh random values (never zeros); shapes
cover C not a multiple of the 256-channel slice or of 16, T not a multiple of the 16-token tile,
n in {2, 4}, both 16-bit dtypes, and persistent grids small enough that one CTA walks several
slices. Inputs are checked unchanged afterwards.
"""

import pytest
import torch
from fixtures.gpu import relative_error as _rel
from fixtures.gpu import requires_hopper

from megatron_mhc.core.ops import reference
from megatron_mhc.kernels.cuda import merge_project as cuda_mp

pytestmark = requires_hopper

#: ||out - ref|| / ||ref||: out is rounded to 16 bits (bf16 unit roundoff 2^-8 relative, fp16
#: 2^-11); the partials are float32 sums of the kernel's own 16-bit out.
TOL_OUT = {torch.bfloat16: 6e-3, torch.float16: 8e-4}
TOL_PARTIAL = 2e-5


def _inputs(t, n, c, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    m = n * n + 2 * n
    x = torch.randn(t, n, c, device="cuda", generator=g).to(dtype)
    y = torch.randn(t, c, device="cuda", generator=g).to(dtype)
    h_post = 2 * torch.rand(t, n, device="cuda", generator=g)
    h_res = torch.rand(t, n, n, device="cuda", generator=g)
    h_res = h_res / h_res.sum(-1, keepdim=True)
    phi = (torch.randn(n * c, m, device="cuda", generator=g) / (n * c) ** 0.5).to(dtype)
    return x, y, h_post, h_res, phi


SHAPES = [(1, 4, 256), (17, 4, 4096), (300, 4, 1000), (33, 4, 136), (64, 2, 136),
          (129, 2, 1288), (1000, 4, 7168)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("t,n,c", SHAPES)
@pytest.mark.parametrize("max_ctas", [0, 3])
def test_merge_project_matches_float64(t, n, c, dtype, max_ctas):
    x, y, h_post, h_res, phi = _inputs(t, n, c, dtype, seed=t * 131 + c + n)
    before = [v.clone() for v in (x, y, h_post, h_res, phi)]
    result = cuda_mp.merge_project_forward(x, y, h_post, h_res, phi, max_ctas=max_ctas)
    assert result is not None, cuda_mp.unsupported_reason(x, phi)
    out, proj_part, ss_part = result
    torch.cuda.synchronize()
    for b, v in zip(before, (x, y, h_post, h_res, phi)):
        assert torch.equal(b, v)  # inputs untouched
    ref = reference.post_res_merge(x.double(), y.double(), h_post.double(), h_res.double())
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, ref) < TOL_OUT[dtype]
    slice_c = cuda_mp.LIBRARY.get().mhc_merge_project_slice(n)
    slices = -(-c // slice_c)
    assert proj_part.shape == (slices, t, n * n + 2 * n) and ss_part.shape == (slices, t)
    o = out.double()
    p = phi.double().view(n, c, -1)
    for s in range(slices):  # every slice's partials written, none left over from the allocation
        cs = slice(s * slice_c, min(c, (s + 1) * slice_c))
        want = torch.einsum("tic,icm->tm", o[:, :, cs], p[:, cs])
        assert _rel(proj_part[s], want) < TOL_PARTIAL, s
        assert _rel(ss_part[s], (o[:, :, cs] ** 2).sum((1, 2))) < TOL_PARTIAL, s


@pytest.mark.parametrize("t,n,c", [(300, 4, 1000), (64, 2, 136), (1000, 4, 4096)])
def test_merged_stream_is_the_triton_merge_bit_for_bit(t, n, c):
    """The stream equals Triton's merge (``merge_into``, what the mHC recompute rebuilds it with)
    bit for bit: the same fma order per element, so a rebuilt stream is the stream."""
    from megatron_mhc.kernels.triton import merge_into

    x, y, h_post, h_res, phi = _inputs(t, n, c, torch.bfloat16, seed=t + n + c)
    out = cuda_mp.merge_project_forward(x, y, h_post, h_res, phi)[0]
    rebuilt = merge_into(x, y, h_post, h_res, torch.empty_like(x))
    assert torch.equal(out, rebuilt), (out.float() - rebuilt.float()).abs().max().item()


def test_merge_project_declines_what_it_does_not_take():
    x, y, h_post, h_res, phi = _inputs(8, 4, 64, torch.bfloat16, seed=1)
    assert cuda_mp.merge_project_forward(x.float(), y.float(), h_post, h_res, phi.float()) is None
    assert "phi shape" in cuda_mp.unsupported_reason(x, phi[:-1])
    x8, y8, hp8, hr8, phi8 = _inputs(8, 8, 64, torch.bfloat16, seed=2)
    assert "n = 8" in cuda_mp.unsupported_reason(x8, phi8)
    assert cuda_mp.merge_project_forward(x8, y8, hp8, hr8, phi8) is None
