"""Autograd-wired Triton mHC ops with the reference ops' signatures (``TRITON_OPS``).

Each op is one ``torch.autograd.Function`` whose forward and backward are fused Triton kernels
(``triton_kernels``); every one is tested against ``megatron_mhc.core.ops.reference`` in float64 terms
under ``TRITON_INTERPRET=1`` on CPU. Stream expand/merge stay on PyTorch (a single copy kernel and
a single reduction kernel each, already at copy bandwidth).
"""

from __future__ import annotations

import os

import torch

from megatron_mhc.core.ops import reference
from megatron_mhc.core.ops.opset import FUSE_GRAD_ACCUMULATION_ATTR, MHCOps
from megatron_mhc.kernels import triton_kernels as K

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's interpreter has no 16-bit tl.dot: 16-bit inputs take the (exact) tf32 path there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Plain-Python launch arithmetic: triton.cdiv / triton.next_power_of_2 are constexpr-function
# wrappers costing several microseconds of host time per call, and every op makes several.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (value - 1).bit_length())


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor, without a dispatcher call when it already is one."""
    if t.dtype is torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"triton mHC op {name}: dtype {x.dtype} not supported "
                        f"(use float32, bfloat16 or float16, or --mhc-kernel-backend torch)")


# ---------------------------------------------------------------------------------------------
# Mappings (norm + projection + gates + Sinkhorn)
# ---------------------------------------------------------------------------------------------
def _projection_dot(x_dtype: torch.dtype, phi: torch.Tensor):
    """The forward projection's DOT_MODE and phi operand for inputs of ``x_dtype``."""
    if x_dtype == torch.float32:
        return 1, phi
    if _INTERPRET:
        return 2, phi
    return 0, phi if phi.dtype == x_dtype else phi.to(x_dtype)


def _projection_splits(extent: int, block: int, per_split: int):
    """(splits, extent per split, a multiple of ``block``): about ``per_split`` per split, 1..16."""
    split = max(1, min(16, _cdiv(extent, per_split)))
    each = _cdiv(_cdiv(extent, split), block) * block
    return _cdiv(extent, each), each


class StreamProjection:
    """A stream's projection partials, made by the merge that wrote the stream
    (``merge_linked_project``) for the next sublayer's entry, so that the entry does not read the
    stream for its norm and projection: ``proj_part [S, T, M]`` (``sum x phi`` over S splits of the
    channels), ``ss_part [S, T]`` (``sum x^2``), and the ``phi`` they were made with."""

    __slots__ = ("proj_part", "ss_part", "phi")

    def __init__(self, proj_part, ss_part, phi):
        self.proj_part, self.ss_part, self.phi = proj_part, ss_part, phi

    def record_stream(self, stream) -> None:
        """``Tensor.record_stream`` for both partials (made on a side stream, used on ``stream``)."""
        self.proj_part.record_stream(stream)
        self.ss_part.record_stream(stream)


#: Programs below which the projection pass takes its small-problem launch: about two per SM of
#: an H100 (132 SMs).
PROJECTION_SMALL_GRID = 264


def projection_plan(t: int, kdim: int):
    """The projection pass's launch for ``[t, kdim]``: (tokens per program, K-block, K per split
    before rounding, warps, stages). Large problems: 64 x 128 tiles on 8 warps, ~2048 of K per
    split. When that grid would leave SMs idle (T = 4096, C = 768: 128 programs), 64 x 64 tiles on
    4 warps and ~512 of K per split (H100: 20.7 -> 18.7 us there, L2 flushed; 112.5 vs 117.9 us at
    T = 8192, C = 4096, where the large launch stays; benchmarks/probe_launch_shapes.py)."""
    if _cdiv(t, 64) * _projection_splits(kdim, 128, 2048)[0] < PROJECTION_SMALL_GRID:
        return 64, 64, 512, 4, 3
    return 64, 128, 2048, 8, 3


def _project(x2, phi_c, m):
    """The projection pass over ``x2 [T, n*C]``: partials ``[S, T, M]`` and ``[S, T]``."""
    t, kdim = x2.shape
    dot_mode, phi_dot = _projection_dot(x2.dtype, phi_c)
    bt, bk, per_split, warps, stages = projection_plan(t, kdim)
    split, k_per_split = _projection_splits(kdim, bk, per_split)
    proj_part = torch.empty(split, t, m, device=x2.device, dtype=torch.float32)
    ss_part = torch.empty(split, t, device=x2.device, dtype=torch.float32)
    K.proj_partial_kernel[(_cdiv(t, bt), split)](
        x2, phi_dot, proj_part, ss_part, t, kdim, k_per_split,
        M=m, BM=_pow2(m, 16), BT=bt, BK=bk, DOT_MODE=dot_mode, num_warps=warps,
        num_stages=stages,
    )
    return proj_part, ss_part


def project_stream(x, phi) -> StreamProjection:
    """The ``StreamProjection`` of a stream ``x [..., n, C]`` with ``phi`` made by the separate
    projection pass (what ``merge_linked_project`` makes inside the merge); no autograd."""
    _check(x, "project_stream")
    n = x.shape[-2]
    with torch.no_grad():
        part, ss = _project(_contig(x.reshape(-1, n * x.shape[-1])), _contig(phi), n * n + 2 * n)
    return StreamProjection(part, ss, phi)


#: (tokens per program, warps) of the mapping kernels: the forward with the pre-apply and the
#: backward. The per-token Sinkhorn work is latency-bound, so few tokens on one warp win: on an
#: H100, backward 35-51 % and forward 5-12 % faster than (16, 4) / (4, 4)
#: (benchmarks/probe_mappings.py, which marks these rows).
MAPPINGS_FWD_TILE = (2, 1)
MAPPINGS_BWD_TILE = (8, 1)


#: Channels per step of the pre-apply inside the mapping forward kernel (256 measured the same at
#: C = 768 and 4096; benchmarks/probe_launch_shapes.py).
MAPPINGS_PRE_BLOCK = 512


def merge_tile(c: int):
    """(tokens, channels, warps) of one program of the merge kernels and the dH_pre pass: 2 tokens
    and the largest power-of-two channel block (128..512) that divides C, with one warp per 128
    channels (8 values per thread and stream). A block that does not divide C leaves masked lanes
    in its last program: at C = 768 the 512-block made the merge backward 45.6 us against 40.7
    for 256 channels on 2 warps (H100, L2 flushed; benchmarks/probe_launch_shapes.py)."""
    bc = 512
    while bc > 128 and c % bc:
        bc //= 2
    return 2, bc, bc // 128


#: (tokens, channels, warps) of one program of the entry backward's dH_pre pass + mapping backward
#: (``pre_mappings_bwd_kernel``): 2 tokens in 128-channel steps on one warp. The per-token
#: Sinkhorn work after the pass is latency-bound and wants one warp, as the mapping kernels do
#: (H100, L2 flushed, benchmarks/probe_launch_shapes.py: 31.2 / 54.1 / 142.0 / 227.0 us at T x C =
#: 4096 x 768 / 4096 x 2048 / 8192 x 4096 / 8192 x 7168, against 36.6 / 60.3 / 144.4 / 228.4 for
#: the dH_pre pass and the mapping backward as two launches; on the dH_pre pass's own tile, 2 x
#: 256-512 on 2-4 warps, the one launch took 66.5 / 116.8 / 238.6 / 307.5).
PRE_MAPPINGS_BWD_TILE = (2, 128, 1)


def dx_pass_splits(t: int, splits: int | None = None):
    """(T-splits, rows per split) of the dx/dphi pass over ``t`` tokens: about ``splits`` splits
    (default: one per 512 tokens, at most 8, for parallelism) of whole 128-row chunks (every
    autotuned BT divides 128)."""
    if splits is None:
        splits = max(1, min(8, _cdiv(t, 512)))
    rows_per_split = _cdiv(_cdiv(t, splits), 128) * 128
    return _cdiv(t, rows_per_split), rows_per_split


def _mappings_forward(x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float,
                      with_pre: bool = False, projection: StreamProjection | None = None):
    """Launch the projection (unless ``projection`` holds it) and the mapping kernel (with the
    pre-apply when ``with_pre``); returns the tensors the backward needs, the mappings and agg."""
    n, c = x.shape[-2], x.shape[-1]
    kdim, m = n * c, n * n + 2 * n
    x2 = _contig(x.reshape(-1, kdim))
    t = x2.shape[0]
    # Parameters go to the kernels in their own dtype (the kernels compute in float32), so no
    # cast kernels run per call; only a 16-bit projection with a different-dtype phi casts it.
    phi_c = _contig(phi)  # saved for the backward
    alpha_f = _contig(alpha)
    bias_f = _contig(bias)
    dev = x2.device
    if projection is None:
        proj_part, ss_part = _project(x2, phi_c, m)
    else:
        proj_part, ss_part = projection.proj_part, projection.ss_part
    split = proj_part.shape[0]
    proj = torch.empty(t, m, device=dev, dtype=torch.float32)
    rinv = torch.empty(t, device=dev, dtype=torch.float32)
    h_pre = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_post = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_res = torch.empty(t, n, n, device=dev, dtype=torch.float32)
    agg = torch.empty(t, c, device=dev, dtype=x.dtype) if with_pre else None
    bt2, warps = MAPPINGS_FWD_TILE if with_pre else (16, 4)
    K.mappings_fwd_kernel[(_cdiv(t, bt2),)](
        proj_part, ss_part, alpha_f, bias_f, proj, rinv, h_pre, h_post, h_res,
        x2, agg if with_pre else proj, t, kdim, c, eps,
        SPLIT=split, N=n, NP=_pow2(n), M=m, BM=_pow2(m, 16), VARIANT_MHC=variant_mhc,
        ITERS=iters, BT=bt2, WITH_PRE=with_pre, BC=MAPPINGS_PRE_BLOCK, num_warps=warps,
    )
    return (x2, phi_c, alpha_f, bias_f, proj, rinv), h_pre, h_post, h_res, agg


#: Operands of the two GEMMs in the mapping backward (dx = dproj @ phi^T, dphi = x^T @ dproj) when x
#: is 16-bit: "input" rounds dproj and phi to x's dtype (fp32 accumulation, as Megatron's own
#: dgrad/wgrad GEMMs; errors in benchmarks/NOTES_kernels.md), "tf32" computes on float32 copies.
#: float32 x always uses ieee float32; the interpreter (no 16-bit dot) always tf32.
BACKWARD_DOT_OPERANDS = os.environ.get("MHC_BACKWARD_DOT_OPERANDS", "input")


def _backward_dot_mode(dtype: torch.dtype) -> int:
    if BACKWARD_DOT_OPERANDS not in ("input", "tf32"):
        raise ValueError(f"MHC_BACKWARD_DOT_OPERANDS={BACKWARD_DOT_OPERANDS!r}: allowed input, tf32")
    if dtype == torch.float32:
        return 1
    if _INTERPRET or BACKWARD_DOT_OPERANDS == "tf32":
        return 2
    return 0


def _main_grad_targets(params):
    """The ``main_grad`` buffers of (phi, alpha, bias) when the backward adds into them itself
    (Megatron's gradient-accumulation fusion, as Transformer-Engine does for its weights): every
    parameter marked by the layer, wrapped by Megatron's DDP (``main_grad`` of its own shape,
    ``grad_added_to_main_grad``). None: return the gradients as usual."""
    if params is None:
        return None
    targets = []
    for param in params:
        main_grad = getattr(param, "main_grad", None)
        if (not getattr(param, FUSE_GRAD_ACCUMULATION_ATTR, False) or main_grad is None
                or not hasattr(param, "grad_added_to_main_grad")
                or main_grad.shape != param.shape or main_grad.device != param.device
                or not main_grad.is_contiguous()):
            return None
        targets.append(main_grad)
    return targets


def _placeholder_grad(param):
    """What the backward returns for a parameter whose gradient it added to ``main_grad``: DDP's
    hook skips it (``grad_added_to_main_grad``) unless ``zero_out_wgrad`` asks for zeros."""
    if getattr(param, "zero_out_wgrad", False):
        return torch.zeros_like(param)
    return torch.empty_like(param)


def _mappings_backward(saved, n, variant_mhc, iters, param_dtypes, dh_pre, dh_post, dh_res,
                       cb=1, d_agg=None, h_pre=None, dx_add=None, dx_out=None, params=None):
    """dx and the parameter grads (in ``param_dtypes``) of the mappings, in three launches.

    ``dh_pre`` None (with ``d_agg``): the entry's dH_pre is summed from x and ``d_agg`` in the
    mapping backward's own launch (``pre_mappings_bwd_kernel``).

    ``dh_post`` / ``dh_res`` are ``[T, cb, n]`` / ``[T, cb, n, n]`` partial sums (cb = 1: the
    gradients themselves). With ``d_agg`` and ``h_pre`` the pre-apply's dx term is added in the
    same pass over x (the fused entry op); with ``dx_add`` another dx of the same stream is added
    (the linked merge's); ``dx_out`` is where dx goes (may be ``dx_add`` itself). ``params``:
    the (phi, alpha, bias) parameters; where ``_main_grad_targets`` allows, their float32 sums go
    straight into ``main_grad`` and placeholders come back.
    """
    x2, phi_c, alpha_f, bias_f, proj, rinv = saved
    t, kdim = x2.shape
    c = kdim // n
    m = n * n + 2 * n
    bm = _pow2(m, 16)
    np_ = _pow2(n)
    dev = x2.device
    dproj = torch.empty(t, m, device=dev, dtype=torch.float32)
    coef = torch.empty(t, device=dev, dtype=torch.float32)
    scratch = torch.empty(t, 2 * iters * np_ if variant_mhc else 1, device=dev,
                          dtype=torch.float32)
    if dh_pre is None:  # the dH_pre pass and the mapping backward in one launch
        bt, bc, warps = PRE_MAPPINGS_BWD_TILE
    else:
        bt, warps = MAPPINGS_BWD_TILE
    blocks = _cdiv(t, bt)
    dalpha_part = torch.empty(blocks, 3, device=dev, dtype=torch.float32)
    dbias_part = torch.empty(blocks, m, device=dev, dtype=torch.float32)
    outs = (dh_post, dh_res, dproj, coef, dalpha_part, dbias_part, scratch)
    meta = dict(N=n, NP=np_, M=m, VARIANT_MHC=variant_mhc, ITERS=iters, BT=bt, num_warps=warps)
    if dh_pre is None:
        K.pre_mappings_bwd_kernel[(blocks,)](x2, d_agg, proj, rinv, alpha_f, bias_f, *outs,
                                             t, kdim, c, cb, BC=bc, **meta)
    else:
        K.mappings_bwd_kernel[(blocks,)](proj, rinv, alpha_f, bias_f, dh_pre, *outs, t, kdim, cb,
                                         **meta)
    dx = torch.empty_like(x2) if dx_out is None else dx_out
    splits, rows_per_split = dx_pass_splits(t)
    dphi_part = torch.empty(splits, kdim, m, device=dev, dtype=torch.float32)
    dalpha_split = torch.empty(splits, 3, device=dev, dtype=torch.float32)
    dbias_split = torch.empty(splits, m, device=dev, dtype=torch.float32)
    with_pre = d_agg is not None
    K.norm_proj_bwd_kernel[lambda meta: (_cdiv(kdim, meta["BK"]), splits)](
        x2, phi_c, dproj, coef, dx, dphi_part,
        h_pre if with_pre else coef, d_agg if with_pre else coef,
        dx_add if dx_add is not None else dx,
        dalpha_part, dbias_part, dalpha_split, dbias_split,
        t, kdim, c, rows_per_split, blocks,
        N=n, M=m, BM=bm, DOT_MODE=_backward_dot_mode(x2.dtype), WITH_PRE=with_pre,
        ADD_DX=dx_add is not None,
    )
    targets = _main_grad_targets(params)
    if targets is None:
        phi_dtype, alpha_dtype, bias_dtype = param_dtypes
        dphi = torch.empty(kdim, m, device=dev, dtype=phi_dtype)
        dalpha = torch.empty(3, device=dev, dtype=alpha_dtype)
        dbias = torch.empty(m, device=dev, dtype=bias_dtype)
    else:
        dphi, dalpha, dbias = targets
    bk = 16  # rows of dphi per program: SP x [16, BM] float32 partials loaded at once
    K.param_grads_kernel[(_cdiv(kdim, bk) + 1,)](
        dphi_part, dphi, dalpha_split, dalpha, dbias_split, dbias, kdim, splits,
        M=m, BM=bm, BK=bk, SP=_pow2(splits), ACCUMULATE=targets is not None, num_warps=4,
    )
    if targets is not None:
        for param in params:
            param.grad_added_to_main_grad = True
        dphi, dalpha, dbias = (_placeholder_grad(param) for param in params)
    return dx, dphi, dalpha, dbias


def _grad_f32(g, shape, device):
    if g is None:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return _f32(g.reshape(shape))


class _MappingsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        saved, h_pre, h_post, h_res, _ = _mappings_forward(x, phi, alpha, bias, variant_mhc,
                                                           iters, eps)
        ctx.save_for_backward(*saved)
        ctx.meta = (lead, n, c, variant_mhc, iters, (phi.dtype, alpha.dtype, bias.dtype))
        ctx.params = (phi, alpha, bias)
        return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, dh_pre, dh_post, dh_res):
        lead, n, c, variant_mhc, iters, param_dtypes = ctx.meta
        saved = ctx.saved_tensors
        t, dev = saved[0].shape[0], saved[0].device
        dx, dphi, dalpha, dbias = _mappings_backward(
            saved, n, variant_mhc, iters, param_dtypes, _grad_f32(dh_pre, (t, n), dev),
            _grad_f32(dh_post, (t, n), dev), _grad_f32(dh_res, (t, n, n), dev),
            params=ctx.params)
        return dx.view(*lead, n, c), dphi, dalpha, dbias, None, None, None


class SublayerLink:
    """What the linked merge's backward hands to the entry's backward of the same sublayer.

    The merge backward runs first (it consumes the entry's outputs) and leaves here its dx of the
    stream (which the entry's dx pass then adds in place, so no separate dx add runs) and its
    per-C-block partials of dH_post / dH_res (which the mapping backward sums, so no reduction
    kernels run). The entry backward takes them and clears the link.
    """

    __slots__ = ("dx", "dh_post_part", "dh_res_part", "stream")

    def __init__(self):
        self.clear()

    def clear(self):
        self.dx = self.dh_post_part = self.dh_res_part = self.stream = None


def _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps, projection=None):
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    saved, h_pre, h_post, h_res, agg = _mappings_forward(
        x, phi, alpha, bias, variant_mhc, iters, eps, with_pre=True, projection=projection)
    ctx.save_for_backward(*saved, h_pre)
    ctx.meta = (lead, n, c, variant_mhc, iters, (phi.dtype, alpha.dtype, bias.dtype))
    ctx.params = (phi, alpha, bias)
    return agg.view(*lead, c), h_post.view(*lead, n), h_res.view(*lead, n, n)


def _entry_backward(ctx, d_agg, dh_post, dh_res, link=None, d_stream=None):
    lead, n, c, variant_mhc, iters, param_dtypes = ctx.meta
    *saved, h_pre = ctx.saved_tensors
    x2 = saved[0]
    t, dev = x2.shape[0], x2.device
    if d_agg is None:
        d_agg = torch.zeros(t, c, device=dev, dtype=x2.dtype)
    d_agg = _contig(d_agg.reshape(t, c))
    dh_pre = None  # summed in the mapping backward's launch (pre_mappings_bwd_kernel)
    cb, dx_out = 1, None
    dx_add = None if d_stream is None else _contig(d_stream.reshape(t, n * c))
    if link is not None and link.dh_post_part is not None:
        if link.stream is not None and link.stream != torch.cuda.current_stream(dev):
            for buf in (link.dx, link.dh_post_part, link.dh_res_part):
                buf.record_stream(torch.cuda.current_stream(dev))
        hp_part, hr_part, cb = link.dh_post_part, link.dh_res_part, link.dh_post_part.shape[1]
        if dh_post is not None or dh_res is not None:  # H_post / H_res used elsewhere too
            hp_part = hp_part.sum(1, keepdim=True) + _grad_f32(dh_post, (t, 1, n), dev)
            hr_part = hr_part.sum(1, keepdim=True) + _grad_f32(dh_res, (t, 1, n, n), dev)
            cb = 1
        dh_post, dh_res = hp_part, hr_part
        # The merge's own fresh buffer comes back unchanged: dx is written over it in place.
        if (dx_add is not None and dx_add.data_ptr() == link.dx.data_ptr()
                and dx_add.dtype == x2.dtype):
            dx_out = dx_add
        link.clear()
    else:
        dh_post = _grad_f32(dh_post, (t, n), dev)
        dh_res = _grad_f32(dh_res, (t, n, n), dev)
    dx, dphi, dalpha, dbias = _mappings_backward(
        saved, n, variant_mhc, iters, param_dtypes, dh_pre, dh_post, dh_res, cb=cb,
        d_agg=d_agg, h_pre=h_pre, dx_add=dx_add, dx_out=dx_out, params=ctx.params)
    return dx.view(*lead, n, c), dphi, dalpha, dbias


class _EntryFunction(torch.autograd.Function):
    """Mappings + pre-apply of one sublayer: (x, phi, alpha, bias) -> (agg, H_post, H_res).

    Forward: the projection pass, then one kernel for the mappings and the pre-apply. Backward:
    one kernel for dH_pre (a pass over x and d_agg) and the per-token mapping backward, one pass
    that writes the whole dx (projection, norm and pre-apply terms) and the dphi partials, and one
    launch for the parameter grads.
    """

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float):
        return _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps)

    @staticmethod
    def backward(ctx, d_agg, dh_post, dh_res):
        return (*_entry_backward(ctx, d_agg, dh_post, dh_res), None, None, None)


class _LinkedEntryFunction(torch.autograd.Function):
    """The entry op of a linked pair: also returns ``x`` itself (``x_link``), which the linked
    merge takes as its stream input. Its dx therefore arrives here as the gradient of ``x_link``
    and is added in the dx pass, and the dH partials arrive through the ``SublayerLink``."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float, link,
                projection):
        ctx.set_materialize_grads(False)
        ctx.link = link
        agg, h_post, h_res = _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps,
                                            projection)
        return agg, h_post, h_res, x

    @staticmethod
    def backward(ctx, d_agg, dh_post, dh_res, d_stream):
        grads = _entry_backward(ctx, d_agg, dh_post, dh_res, link=ctx.link, d_stream=d_stream)
        return (*grads, None, None, None, None, None)


def _check_mapping_args(x, phi, variant: str, name: str) -> None:
    _check(x, name)
    if variant not in ("mhc", "hc"):
        raise ValueError(f"mappings are defined for variant 'mhc' or 'hc', got {variant!r}")
    reference.check_phi_shape(x, phi)


def compute_mappings(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6):
    """Triton ``compute_mappings`` (see ``megatron_mhc.core.ops.reference.compute_mappings``)."""
    _check_mapping_args(x, phi, variant, "compute_mappings")
    return _MappingsFunction.apply(x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters),
                                   float(eps))


def enter(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6):
    """Triton fused ``(pre_apply(x, H_pre), H_post, H_res)`` of one sublayer (see
    ``megatron_mhc.core.ops.reference.enter``)."""
    _check_mapping_args(x, phi, variant, "enter")
    return _EntryFunction.apply(x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters),
                                float(eps))


def enter_linked(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6,
                 projection=None):
    """``enter`` plus ``(x_link, link)`` for ``merge_linked``: the pair's backward writes the
    stream's whole dx once (entry + merge terms) with no autograd add and no dH reductions.
    ``x_link`` is ``x`` (an alias); pass it, not ``x``, to ``merge_linked``. ``projection``: the
    ``StreamProjection`` that ``merge_linked_project`` made of ``x`` with this ``phi`` (then x is
    not read for the norm and projection)."""
    _check_mapping_args(x, phi, variant, "enter_linked")
    if projection is not None:
        _check_projection(projection, x, phi)
    link = SublayerLink()
    agg, h_post, h_res, x_link = _LinkedEntryFunction.apply(
        x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters), float(eps), link, projection)
    return agg, h_post, h_res, x_link, link


def _check_projection(projection, x, phi) -> None:
    if not isinstance(projection, StreamProjection):
        raise TypeError(f"projection must be a StreamProjection, got {type(projection).__name__}")
    n = x.shape[-2]
    t = x.numel() // (n * x.shape[-1])
    part = projection.proj_part
    if projection.phi is not phi or part.shape[1:] != (t, n * n + 2 * n):
        raise ValueError(
            f"projection was made for another phi or stream (partials {list(part.shape)}, "
            f"expected [S, {t}, {n * n + 2 * n}] made with this phi)")


# ---------------------------------------------------------------------------------------------
# Pre-apply
# ---------------------------------------------------------------------------------------------
class _PreApplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        x3 = _contig(x.reshape(-1, n, c))
        h = _f32(h_pre.reshape(-1, n))
        t = x3.shape[0]
        out = torch.empty(t, c, device=x.device, dtype=x.dtype)
        bt, bc = 4, 512
        K.pre_apply_fwd_kernel[(_cdiv(t, bt), _cdiv(c, bc))](
            x3, h, out, t, c, N=n, BT=bt, BC=bc, num_warps=4)
        ctx.save_for_backward(x3, h)
        ctx.meta = (lead, h_pre.dtype)
        return out.view(*lead, c)

    @staticmethod
    def backward(ctx, dout):
        x3, h = ctx.saved_tensors
        lead, h_dtype = ctx.meta
        t, n, c = x3.shape
        d = _contig(dout.reshape(t, c))
        dx = torch.empty_like(x3)
        dh = torch.empty(t, n, device=x3.device, dtype=torch.float32)
        bt, bc = 2, 512
        K.pre_apply_bwd_kernel[(_cdiv(t, bt),)](
            x3, h, d, dx, dh, t, c, N=n, NP=_pow2(n), BT=bt, BC=bc, WRITE_DX=True, num_warps=4)
        return dx.view(*lead, n, c), dh.view(*lead, n).to(h_dtype)


def pre_apply(x, h_pre):
    """Triton ``pre_apply`` (see ``megatron_mhc.core.ops.reference.pre_apply``)."""
    _check(x, "pre_apply")
    return _PreApplyFunction.apply(x, h_pre)


# ---------------------------------------------------------------------------------------------
# Post/residual merge
# ---------------------------------------------------------------------------------------------
def _merge_operands(x, y, h_post, h_res):
    """The merge's kernel operands: ``x3 [T, n, C]``, ``y2 [T, C]``, float32 ``hp``, ``hr``."""
    n, c = x.shape[-2], x.shape[-1]
    x3 = _contig(x.reshape(-1, n, c))
    t = x3.shape[0]
    return x3, _contig(y.reshape(t, c)), _f32(h_post.reshape(t, n)), _f32(h_res.reshape(t, n, n))


def _merge_inputs(ctx, x, y, h_post, h_res):
    """``_merge_operands``, saved for the merge's backward with the leading dims and dtypes in
    ``ctx.meta``."""
    x3, y2, hp, hr = _merge_operands(x, y, h_post, h_res)
    ctx.save_for_backward(x3, y2, hp, hr)
    ctx.meta = (x.shape[:-2], y.dtype, h_post.dtype, h_res.dtype)
    return x3, y2, hp, hr


def _launch_post_res_fwd(x3, y2, hp, hr, out):
    """The merge kernel over ``[T, n, C]`` operands. Each program loads its whole tile (every
    stream of its tokens and channels) before storing it, so ``out`` may be ``x3`` itself."""
    t, n, c = x3.shape
    bt, bc, warps = merge_tile(c)
    K.post_res_fwd_kernel[(_cdiv(t, bt), _cdiv(c, bc))](
        x3, y2, hp, hr, out, t, c, N=n, NP=_pow2(n), BT=bt, BC=bc, num_warps=warps)
    return out


def _post_res_forward(ctx, x, y, h_post, h_res):
    x3, y2, hp, hr = _merge_inputs(ctx, x, y, h_post, h_res)
    return _launch_post_res_fwd(x3, y2, hp, hr, torch.empty_like(x3)).view_as(x)


def _post_res_backward(ctx, dout):
    """dx, dy and the per-C-block partials of dH_post [T, CB, n] and dH_res [T, CB, n, n]."""
    x3, y2, hp, hr = ctx.saved_tensors
    y_dtype = ctx.meta[1]
    t, n, c = x3.shape
    d = _contig(dout.reshape(t, n, c))
    dx = torch.empty_like(x3)
    dy = torch.empty(t, c, device=x3.device, dtype=y_dtype)
    bt, bc, warps = merge_tile(c)
    cb = _cdiv(c, bc)
    dhp_part = torch.empty(t, cb, n, device=x3.device, dtype=torch.float32)
    dhr_part = torch.empty(t, cb, n, n, device=x3.device, dtype=torch.float32)
    K.post_res_bwd_kernel[(_cdiv(t, bt), cb)](
        x3, y2, hp, hr, d, dx, dy, dhp_part, dhr_part, t, c, cb, N=n, NP=_pow2(n), BT=bt,
        BC=bc, num_warps=warps)
    return dx, dy, dhp_part, dhr_part


class _PostResFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        return _post_res_forward(ctx, x, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        lead, _, hp_dtype, hr_dtype = ctx.meta
        dx, dy, dhp_part, dhr_part = _post_res_backward(ctx, dout)
        n, c = dx.shape[-2], dx.shape[-1]
        return (dx.view(*lead, n, c), dy.view(*lead, c),
                dhp_part.sum(1).view(*lead, n).to(hp_dtype),
                dhr_part.sum(1).view(*lead, n, n).to(hr_dtype))


class _LinkedPostResFunction(torch.autograd.Function):
    """The merge of a linked pair: its dx and dH partials go to the entry's backward (dx as the
    gradient of ``x_link``, the partials through the ``SublayerLink``); no reduction kernels."""

    @staticmethod
    def forward(ctx, x_link, y, h_post, h_res, link):
        ctx.link = link
        return _post_res_forward(ctx, x_link, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        lead = ctx.meta[0]
        dx, dy, dhp_part, dhr_part = _post_res_backward(ctx, dout)
        link = ctx.link
        link.dx, link.dh_post_part, link.dh_res_part = dx, dhp_part, dhr_part
        link.stream = torch.cuda.current_stream(dx.device) if dx.is_cuda else None
        n, c = dx.shape[-2], dx.shape[-1]
        return dx.view(*lead, n, c), dy.view(*lead, c), None, None, None


def _post_res_proj_forward(ctx, x, y, h_post, h_res, next_phi):
    """The merge's forward plus the next sublayer's projection partials of its output."""
    x3, y2, hp, hr = _merge_inputs(ctx, x, y, h_post, h_res)
    t, n, c = x3.shape
    out = torch.empty_like(x3)
    m = n * n + 2 * n
    dot_mode, phi_dot = _projection_dot(x3.dtype, _contig(next_phi))
    split, c_per_split = _projection_splits(c, 128, 512)  # 128: a multiple of every tuned BC
    proj_part = torch.empty(split, t, m, device=x3.device, dtype=torch.float32)
    ss_part = torch.empty(split, t, device=x3.device, dtype=torch.float32)
    K.post_res_proj_fwd_kernel[lambda meta: (_cdiv(t, meta["BT"]), split)](
        x3, y2, hp, hr, out, phi_dot, proj_part, ss_part, t, c, c_per_split,
        N=n, M=m, BM=_pow2(m, 16), DOT_MODE=dot_mode)
    return out.view_as(x), proj_part, ss_part


class _LinkedPostResProjFunction(torch.autograd.Function):
    """``_LinkedPostResFunction`` whose forward also leaves the next sublayer's projection
    partials of the merged stream (not differentiable: the next entry's backward differentiates
    its norm and projection of the stream itself, as if it had made them)."""

    @staticmethod
    def forward(ctx, x_link, y, h_post, h_res, link, next_phi):
        ctx.set_materialize_grads(False)
        ctx.link = link
        out, proj_part, ss_part = _post_res_proj_forward(ctx, x_link, y, h_post, h_res, next_phi)
        ctx.mark_non_differentiable(proj_part, ss_part)
        return out, proj_part, ss_part

    @staticmethod
    def backward(ctx, dout, _dproj_part, _dss_part):
        return (*_LinkedPostResFunction.backward(ctx, dout), None)


def post_res_merge(x, y, h_post, h_res):
    """Triton ``post_res_merge`` (see ``megatron_mhc.core.ops.reference.post_res_merge``)."""
    _check(x, "post_res_merge")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return _PostResFunction.apply(x, y, h_post, h_res)


def merge_into(x, y, h_post, h_res, out):
    """``post_res_merge(x, y, h_post, h_res)`` written into ``out`` (``x``'s shape, dtype and
    device, contiguous; may be ``x`` itself), without autograd: the recompute's rebuild of a
    stream in place of its parent. Returns ``out``."""
    _check(x, "merge_into")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"merge_into: out must match x {tuple(x.shape)} {x.dtype} {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")
    if not out.is_contiguous():
        raise ValueError("merge_into: out must be contiguous")
    x3, y2, hp, hr = _merge_operands(x, y.to(x.dtype), h_post, h_res)
    _launch_post_res_fwd(x3, y2, hp, hr, out.view(x3.shape))  # a raw launch: no autograd
    return out


def merge_linked(x_link, y, h_post, h_res, link):
    """``post_res_merge`` of the pair opened by ``enter_linked`` (``x_link``, ``h_post``, ``h_res``
    and ``link`` are what it returned)."""
    _check(x_link, "merge_linked")
    if y.dtype != x_link.dtype:
        y = y.to(x_link.dtype)
    return _LinkedPostResFunction.apply(x_link, y, h_post, h_res, link)


def merge_linked_project(x_link, y, h_post, h_res, link, next_phi):
    """``merge_linked`` that also returns the ``StreamProjection`` of its output for the next
    sublayer's ``enter_linked(out, next_phi, ..., projection=...)``: the merge's pass over the
    new stream gives the next norm and projection, so the next entry does not read it for them."""
    _check(x_link, "merge_linked_project")
    reference.check_phi_shape(x_link, next_phi, "next_phi")
    if y.dtype != x_link.dtype:
        y = y.to(x_link.dtype)
    out, proj_part, ss_part = _LinkedPostResProjFunction.apply(x_link, y, h_post, h_res, link,
                                                              next_phi)
    return out, StreamProjection(proj_part, ss_part, next_phi)


#: Cross-sublayer fusion in the layer (``MHC_CROSS_SUBLAYER_FUSION=1``): off by default, because
#: its merge + projection kernel is slower than the merge and projection kernels it replaces
#: (H100, C=4096: 623 us against the merge's 216 us in the same run, plus 106 us for the
#: projection pass in another; benchmarks/RESULTS.md). The ops themselves are
#: always available here (``merge_linked_project``, ``enter_linked(..., projection=...)``).
CROSS_SUBLAYER_FUSION = os.environ.get("MHC_CROSS_SUBLAYER_FUSION", "0")
if CROSS_SUBLAYER_FUSION not in ("0", "1"):
    raise ValueError(f"MHC_CROSS_SUBLAYER_FUSION={CROSS_SUBLAYER_FUSION!r}: allowed 0, 1")

TRITON_OPS = MHCOps(
    name="triton",
    compute_mappings=compute_mappings,
    enter=enter,
    pre_apply=pre_apply,
    post_res_merge=post_res_merge,
    expand_streams=reference.expand_streams,
    merge_streams=reference.merge_streams,
    enter_linked=enter_linked,
    merge_linked=merge_linked,
    merge_linked_project=merge_linked_project if CROSS_SUBLAYER_FUSION == "1" else None,
    merge_into=merge_into,
)
