"""The norm + projection of the stream onto the M = n*n + 2n mapping logits, both directions.

Forward (``proj_partial_kernel``): one read of x gives ``x @ phi`` and ``sum(x^2)`` as split-K
partials, which the mapping forward kernel (``mappings.py``) reduces; ``StreamProjection`` /
``project_stream`` keep them for an entry that does not read the stream itself (cross-sublayer
fusion, ``merge.py``'s ``merge_linked_project``). Backward (``norm_proj_bwd_kernel``, the dx/dphi
pass): ``dx = dproj @ phi^T + coef * x`` (+ the pre-apply term, + another dx of the stream) and
the dphi partials; the last program of each K-block to finish reduces its dphi rows (and, for the
first block, dalpha and dbias) into the gradients or Megatron's ``main_grad``, in the same launch.
The mapping and entry ops (``mappings.py``, ``entry.py``) launch both directions.
``MHC_BACKWARD_DOT_OPERANDS`` is read here (``BACKWARD_DOT_OPERANDS``: set it on this module).
"""

import os

import torch
import triton
import triton.language as tl

from megatron_mhc.core.ops.opset import FUSE_GRAD_ACCUMULATION_ATTR
from megatron_mhc.kernels.triton._launch import _INTERPRET, _cdiv, _check, _contig, _dot_acc, _pow2


# ----------------------------------------------------------------------------------------------
# Norm + projection (+ mappings) forward: one read of x gives x @ phi and sum(x^2) (split over K
# for parallelism), then a small per-token kernel reduces the splits and computes the mappings.
# ----------------------------------------------------------------------------------------------
@triton.jit
def proj_partial_kernel(
    x_ptr, phi_ptr, proj_part_ptr, ss_part_ptr, T, K, k_per_split,
    M: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Partial x @ phi and sum(x^2) over one K-split: [SPLIT, T, M] and [SPLIT, T].

    DOT_MODE 0: operands in x's 16-bit dtype (phi cast by the caller); 1: float32 ieee;
    2: float32 via tf32 (16-bit x under the interpreter, which has no 16-bit dot).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    cols_m = tl.arange(0, BM)
    acc = tl.zeros([BT, BM], dtype=tl.float32)
    sq = tl.zeros([BT, BK], dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :],
                     mask=k_ok[:, None] & (cols_m[None, :] < M), other=0.0)
        xf = xt.to(tl.float32)
        acc = _dot_acc(xt, xf, pt, acc, DOT_MODE)
        sq += xf * xf
    tl.store(ss_part_ptr + split * T + rows, tl.sum(sq, axis=1), mask=row_ok)
    tl.store(proj_part_ptr + split * T * M + rows[:, None] * M + cols_m[None, :], acc,
             mask=row_ok[:, None] & (cols_m[None, :] < M))


# ----------------------------------------------------------------------------------------------
# Norm + projection backward: dx = dproj @ phi^T + coef * x, dphi = x^T @ dproj (per T-split).
# ----------------------------------------------------------------------------------------------
def _norm_proj_bwd_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BK": 64, "BT": 32}, num_warps=4)]
    # The four best of ten tile shapes measured on an H100 (benchmarks/probes/probe_norm_proj_bwd.py;
    # T=8192, n=4, C=4096/7168: 128x64 with 4 warps and 4 stages first, the rest within 20 %).
    return [
        triton.Config({"BK": bk, "BT": bt}, num_warps=w, num_stages=st)
        for bk, bt, w, st in ((128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3))
    ]


@triton.autotune(configs=_norm_proj_bwd_configs(),
                 key=["K", "C", "M", "WITH_PRE", "ADD_DX", "DOT_MODE", "ACCUMULATE", "G_RES"],
                 reset_to_zero=[], restore_value=["dx_ptr", "dphi_ptr", "dalpha_ptr", "dbias_ptr"])
@triton.jit
def norm_proj_bwd_kernel(
    x_ptr, phi_ptr, dproj_ptr, coef_ptr, dx_ptr, dphi_part_ptr, h_pre_ptr, d_agg_ptr, dx_add_ptr,
    dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
    dphi_ptr, dalpha_ptr, dbias_ptr, arrivals_ptr,
    T, K, C, rows_per_split, G,
    N: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, SP: tl.constexpr,
    DOT_MODE: tl.constexpr, WITH_PRE: tl.constexpr, ADD_DX: tl.constexpr,
    ACCUMULATE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    g_ptr=None, h_res_ptr=None, G_RES: tl.constexpr = False,
):
    """dx = dproj @ phi^T + coef * x (+ pre-apply term, + dx_add), dphi partial = x^T @ dproj,
    and the parameter gradients dphi, dalpha, dbias, in one launch.

    Grid (K-blocks, T-splits). The programs of the first K-block also sum one share of the
    mapping backward's alpha / bias partials (``[G, 3]`` / ``[G, M]``, one row per token block)
    into ``[SPLITS, 3]`` / ``[SPLITS, M]``: a few rows each here, where one program summing all G
    rows (thousands at T = 8192) took 15-30 us on an H100.

    Each program then counts its arrival on ``arrivals_ptr[kb]`` (int32, zero at launch); the
    last of a K-block's SPLITS programs sums the block's dphi partials (and, for K-block 0, the
    alpha / bias split rows) in split order, so the result does not depend on which program came
    last (deterministic), writes them in the outputs' dtypes (ACCUMULATE: adds them in float32 to
    what the outputs hold, Megatron's ``main_grad``), and sets the counter back to zero for the
    next launch or CUDA-graph replay. SP: SPLITS rounded up to a power of two.

    G_RES (the "dx once" backward): also add the merge's term ``sum_j H_res[t, j, i] g[t, j, c]``
    (k = i*C + c) from its upstream gradient g ``[T, n*C]`` and float32 ``h_res [T, n, n]``: the
    merge backward then writes no dx of its own. ``dx_ptr`` must not be ``g_ptr`` (other
    programs still read g_i after this one writes dx_i).

    WITH_PRE: also add the pre-apply gradient h_pre[t, i] * d_agg[t, c] (k = i*C + c), so the
    fused entry op writes its whole dx in this one pass. ADD_DX: also add ``dx_add`` (the post/res
    merge's dx of the same stream; ``dx_add_ptr`` may be ``dx_ptr`` itself: each element is read
    before it is written by the same program). DOT_MODE 0: both GEMMs on x's 16-bit dtype
    (dproj and phi rounded to it, fp32 accumulation); 1: float32 ieee; 2: float32 via tf32.
    """
    kb = tl.program_id(0)
    split = tl.program_id(1)
    ks = kb * BK + tl.arange(0, BK)
    k_ok = ks < K
    cols_m = tl.arange(0, BM)
    m_ok = cols_m < M
    phi_t = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :],
                    mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BK, BM]
    if DOT_MODE == 0:
        phi_t = phi_t.to(x_ptr.dtype.element_ty)
    else:
        phi_t = phi_t.to(tl.float32)
    dphi = tl.zeros([BK, BM], dtype=tl.float32)
    t_begin = split * rows_per_split
    for t0 in range(t_begin, t_begin + rows_per_split, BT):
        rows = t0 + tl.arange(0, BT)
        row_ok = rows < T
        xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xf = xt.to(tl.float32)
        dp = tl.load(dproj_ptr + rows[:, None] * M + cols_m[None, :],
                     mask=row_ok[:, None] & m_ok[None, :], other=0.0)  # [BT, BM] fp32
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        if DOT_MODE == 0:
            dp16 = dp.to(xt.dtype)
            dxt = tl.dot(dp16, tl.trans(phi_t))
            dphi = tl.dot(tl.trans(xt), dp16, dphi)
        elif DOT_MODE == 1:
            dxt = tl.dot(dp, tl.trans(phi_t), input_precision="ieee")
            dphi = tl.dot(tl.trans(xf), dp, dphi, input_precision="ieee")
        else:
            dxt = tl.dot(dp, tl.trans(phi_t), input_precision="tf32")
            dphi = tl.dot(tl.trans(xf), dp, dphi, input_precision="tf32")
        dxt += coef[:, None] * xf
        if ADD_DX:
            dxt += tl.load(dx_add_ptr + rows[:, None] * K + ks[None, :],
                           mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if G_RES:
            m2g = row_ok[:, None] & k_ok[None, :]
            for j in tl.static_range(N):
                gj = tl.load(g_ptr + rows[:, None] * K + (j * C + ks % C)[None, :], mask=m2g,
                             other=0.0).to(tl.float32)
                if C % BK == 0:  # the block lies in one stream, (kb * BK) // C
                    hr = tl.load(h_res_ptr + rows * (N * N) + j * N + (kb * BK) // C,
                                 mask=row_ok, other=0.0)
                    dxt += hr[:, None] * gj
                else:
                    hr2 = tl.load(h_res_ptr + rows[:, None] * (N * N) + j * N + (ks // C)[None, :],
                                  mask=m2g, other=0.0)
                    dxt += hr2 * gj
        if WITH_PRE:
            m2 = row_ok[:, None] & k_ok[None, :]
            da = tl.load(d_agg_ptr + rows[:, None] * C + (ks % C)[None, :], mask=m2, other=0.0)
            if C % BK == 0:  # the block lies in one stream, (kb * BK) // C
                hp = tl.load(h_pre_ptr + rows * N + (kb * BK) // C, mask=row_ok, other=0.0)
                dxt += hp[:, None] * da.to(tl.float32)
            else:
                hp2 = tl.load(h_pre_ptr + rows[:, None] * N + (ks // C)[None, :], mask=m2,
                              other=0.0)
                dxt += hp2 * da.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dxt.to(xt.dtype),
                 mask=row_ok[:, None] & k_ok[None, :])
    tl.store(dphi_part_ptr + split * K * M + ks[:, None] * M + cols_m[None, :], dphi,
             mask=k_ok[:, None] & m_ok[None, :])
    splits = tl.num_programs(1)
    if kb == 0:
        _sum_rows_share(dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
                        G, split, splits, M, BM)
    # Every thread's partials are stored before one thread's release-acquire count (the pattern
    # of CUTLASS's split-K semaphores); the last arrival reads the others' partials after it.
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + kb, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        _finish_param_grads(dphi_part_ptr, dphi_ptr, dalpha_split_ptr, dalpha_ptr,
                            dbias_split_ptr, dbias_ptr, kb, K, splits,
                            M, BM, SP, BK, ACCUMULATE)
        tl.atomic_xchg(arrivals_ptr + kb, 0, sem="relaxed", scope="gpu")


@triton.jit
def _finish_param_grads(dphi_part_ptr, dphi_ptr, dalpha_split_ptr, dalpha_ptr, dbias_split_ptr,
                        dbias_ptr, kb, K, SPLITS, M: tl.constexpr, BM: tl.constexpr,
                        SP: tl.constexpr, BK: tl.constexpr, ACCUMULATE: tl.constexpr):
    """K-block ``kb``'s dphi rows summed over the SPLITS partials ``[SPLITS, K, M]`` (split 0
    first), and for ``kb == 0`` dalpha / dbias over their ``[SPLITS, 3]`` / ``[SPLITS, M]`` rows,
    stored in the outputs' dtypes (ACCUMULATE: added to what they hold). Partials are read past
    L1 (``.cg``): other SMs wrote them."""
    RB: tl.constexpr = 32  # dphi rows per step: SP partial tiles of [RB, BM] in flight
    tl.static_assert(BK % RB == 0)
    cols = tl.arange(0, BM)
    m_ok = cols < M
    for r0 in tl.static_range(0, BK, RB):
        ks = kb * BK + r0 + tl.arange(0, RB)
        mask = (ks < K)[:, None] & m_ok[None, :]
        offs = ks[:, None] * M + cols[None, :]
        acc = tl.zeros([RB, BM], dtype=tl.float32)
        for s in tl.static_range(SP):
            acc += tl.load(dphi_part_ptr + s * (K * M) + offs, mask=mask & (s < SPLITS),
                           other=0.0, cache_modifier=".cg")
        if ACCUMULATE:
            acc += tl.load(dphi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dphi_ptr + offs, acc.to(dphi_ptr.dtype.element_ty), mask=mask)
    if kb == 0:
        sp = tl.arange(0, SP)
        sp_ok = sp < SPLITS
        a3 = tl.arange(0, 4)
        bias_sum = tl.sum(tl.load(dbias_split_ptr + sp[:, None] * M + cols[None, :],
                                  mask=sp_ok[:, None] & m_ok[None, :], other=0.0,
                                  cache_modifier=".cg"), axis=0)
        alpha_sum = tl.sum(tl.load(dalpha_split_ptr + sp[:, None] * 3 + a3[None, :],
                                   mask=sp_ok[:, None] & (a3 < 3)[None, :], other=0.0,
                                   cache_modifier=".cg"), axis=0)
        if ACCUMULATE:
            bias_sum += tl.load(dbias_ptr + cols, mask=m_ok, other=0.0).to(tl.float32)
            alpha_sum += tl.load(dalpha_ptr + a3, mask=a3 < 3, other=0.0).to(tl.float32)
        tl.store(dbias_ptr + cols, bias_sum.to(dbias_ptr.dtype.element_ty), mask=m_ok)
        tl.store(dalpha_ptr + a3, alpha_sum.to(dalpha_ptr.dtype.element_ty), mask=a3 < 3)


@triton.jit
def _sum_rows_share(dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
                    G, share, SHARES, M: tl.constexpr, BM: tl.constexpr):
    """Chunk ``share`` of SHARES equal chunks of the rows of ``[G, 3]`` / ``[G, M]``, summed
    (in a fixed order: deterministic) into row ``share`` of ``[SHARES, 3]`` / ``[SHARES, M]``."""
    BG: tl.constexpr = 64
    cols = tl.arange(0, BM)
    m_ok = cols < M
    a3 = tl.arange(0, 4)
    per_share = tl.cdiv(G, SHARES)
    g_begin = share * per_share
    g_end = tl.minimum(g_begin + per_share, G)
    bias_acc = tl.zeros([BG, BM], dtype=tl.float32)
    alpha_acc = tl.zeros([BG, 4], dtype=tl.float32)
    for g0 in range(g_begin, g_end, BG):
        gs = g0 + tl.arange(0, BG)
        g_ok = gs < g_end
        bias_acc += tl.load(dbias_part_ptr + gs[:, None] * M + cols[None, :],
                            mask=g_ok[:, None] & m_ok[None, :], other=0.0)
        alpha_acc += tl.load(dalpha_part_ptr + gs[:, None] * 3 + a3[None, :],
                             mask=g_ok[:, None] & (a3 < 3)[None, :], other=0.0)
    tl.store(dbias_split_ptr + share * M + cols, tl.sum(bias_acc, axis=0), mask=m_ok)
    tl.store(dalpha_split_ptr + share * 3 + a3, tl.sum(alpha_acc, axis=0), mask=a3 < 3)


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
    T = 8192, C = 4096, where the large launch stays; benchmarks/probes/probe_launch_shapes.py)."""
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
    proj_partial_kernel[(_cdiv(t, bt), split)](
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


def dx_pass_splits(t: int, splits: int | None = None):
    """(T-splits, rows per split) of the dx/dphi pass over ``t`` tokens: about ``splits`` splits
    (default: one per 512 tokens, at most 8, for parallelism) of whole 128-row chunks (every
    autotuned BT divides 128)."""
    if splits is None:
        splits = max(1, min(8, _cdiv(t, 512)))
    rows_per_split = _cdiv(_cdiv(t, splits), 128) * 128
    return _cdiv(t, rows_per_split), rows_per_split


#: The dx pass's arrival counters, one int32 per K-block, per (device, stream): launches on one
#: stream run in order and each launch leaves its counters at zero again.
_ARRIVAL_COUNTERS: dict = {}
_MIN_BK = 32  # no autotuned BK is smaller: enough counters for any of them


def arrival_counters(device: torch.device, kdim: int) -> torch.Tensor:
    """Zeroed int32 counters for one dx/dphi pass over ``kdim`` columns on ``device``'s current
    stream. Reused across launches (the pass sets them back to zero) except under CUDA-graph
    capture, where each call gets its own (a memset node in the graph), so graphs captured on
    one stream may replay concurrently."""
    count = _cdiv(kdim, _MIN_BK)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, device=device, dtype=torch.int32)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), device=device, dtype=torch.int32)
        _ARRIVAL_COUNTERS[key] = counters
    return counters


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
