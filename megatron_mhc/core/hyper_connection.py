"""HyperConnection: the learnable mappings wrapped around one sublayer (attention or MLP).

Parameters (per sublayer): ``phi [n*C, n*n+2n]`` (the dynamic projection; the RMSNorm scale is
folded into it), ``alpha [3]`` (the pre/post/res gates) and ``bias [n*n+2n]`` (the static mapping,
laid out ``[pre | post | res row-major]``). They are replicated across tensor-parallel ranks; under
sequence parallelism each rank sees different tokens, so they carry ``sequence_parallel=True`` and
Megatron's ``finalize_model_grads`` all-reduces their gradients over the TP group.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_mhc.core.config import MHCConfig
from megatron_mhc.core.link import GenericLink
from megatron_mhc.core.ops import MHCOps
from megatron_mhc.core.ops.opset import FUSE_GRAD_ACCUMULATION_ATTR


def static_bias_init(mhc_config: MHCConfig) -> Tensor:
    """The static bias at init: the static mapping equals the plain residual.

    Following the Hyper-Connections paper's choice of a static part equivalent to the Pre-Norm
    residual: H_pre = 1/n on every stream (the aggregate of identical streams is the stream),
    H_post = 1 (each stream receives the sublayer output) and H_res ~ I.

    * ``mhc``: b_pre = logit(1/n), b_post = 0 (2*sigmoid(0) = 1), b_res = res_init_logit * I
      (Sinkhorn of it is symmetric and doubly stochastic, diagonal e^c / (e^c + n - 1)).
    * ``hc``: b_pre = 1/n, b_post = 1, b_res = I (the values themselves; no activation).
    """
    n = mhc_config.n
    if mhc_config.variant == "mhc":
        pre = torch.full((n,), -math.log(n - 1))
        post = torch.zeros(n)
        res = torch.eye(n) * mhc_config.res_init_logit
    else:
        pre = torch.full((n,), 1.0 / n)
        post = torch.ones(n)
        res = torch.eye(n)
    return torch.cat([pre, post, res.flatten()])


class HyperConnection(MegatronModule):
    """The (m)HC mappings of one sublayer and the three calls the layer makes with them."""

    def __init__(
        self,
        config: TransformerConfig,
        mhc_config: MHCConfig,
        ops: MHCOps,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config=config)
        self.mhc_config = mhc_config
        self.ops = ops
        if tp_group is not None:
            self.tp_group = tp_group
        n, hidden = mhc_config.n, config.hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        # The model's dtype (Megatron's non-distributed mixed-precision optimizer cannot
        # checkpoint float32 parameters of a 16-bit model); the kernels compute in float32.
        dtype = config.params_dtype
        self.phi = torch.nn.Parameter(
            torch.empty(n * hidden, mhc_config.mapping_width, device=device, dtype=dtype)
        )
        self.alpha = torch.nn.Parameter(torch.empty(3, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(
            torch.empty(mhc_config.mapping_width, device=device, dtype=dtype)
        )
        for param in (self.phi, self.alpha, self.bias):
            param.sequence_parallel = bool(config.sequence_parallel)
            # Megatron's gradient-accumulation fusion (on by default in pretrain_gpt.py): the
            # Triton backward adds these grads to DDP's float32 main_grad itself, as TE's layers
            # do for their weights (no separate add per parameter and micro-batch, and no
            # rounding of the grads to the parameters' 16-bit dtype first).
            setattr(param, FUSE_GRAD_ACCUMULATION_ATTR,
                    bool(getattr(config, "gradient_accumulation_fusion", False)))
        #: When a list, every forward appends its H_res (detached) here; see megatron_mhc.core.gains.
        self.recorded_h_res: Optional[List[Tensor]] = None
        #: Under CUDA graphs a replay runs no Python, so instead of appending, every forward copies
        #: its H_res into this fixed buffer (a copy kernel inside the graph); the gain metrics read
        #: the latest micro-batch's H_res from it.
        self.snapshot_h_res = getattr(config, "cuda_graph_impl", "none") not in (None, "none")
        self.h_res_snapshot: Optional[Tensor] = None
        #: Position in the model: 2 * (layer_number - 1) + (0 attention, 1 MLP); set by the layer.
        self.sublayer_index = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """(Re-)initialise per ``mhc_config.init_method`` (see ``static_bias_init``)."""
        self.config.init_method(self.phi)
        # function_preserving: gates 0, so H~ = bias (the plain residual) whatever phi is. phi
        # stays random: with phi = 0 every stream would stay identical forever (the model is
        # symmetric under permuting streams and gradient steps keep that symmetry); random phi
        # breaks it through the gates' gradients.
        gate = 0.0 if self.mhc_config.init_method == "function_preserving" else self.mhc_config.gate_init
        self.alpha.fill_(gate)
        self.bias.copy_(static_bias_init(self.mhc_config))

    def enter(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(sublayer input sum_i H_pre[i] x[i], H_post, H_res)`` in one fused op."""
        cfg = self.mhc_config
        agg, h_post, h_res = self.ops.enter(
            x, self.phi, self.alpha, self.bias, cfg.variant, cfg.sinkhorn_iters, cfg.norm_eps
        )
        self._record(h_res)
        return agg, h_post, h_res

    def enter_linked(self, x: Tensor, projection: Any = None
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Any]:
        """``enter`` for a sublayer whose merge is ``merge_linked``: also ``x_link`` (``x``, to be
        passed to the merge instead of it) and ``link``. The merge's gradients for H_post / H_res
        reach the entry's backward through the link, not through autograd, so the merge may run
        in another autograd graph than the entry (a schedule node of Megatron's EP-overlap
        schedule) with only the stream crossing. The kernel sets' own linked pair also writes the
        stream's dx once (no autograd add of two dx); other sets get ``GenericLink``.
        ``projection``: what the previous merge's ``merge_linked_project`` made of ``x`` for this
        sublayer (then x is not read again for the norm and projection)."""
        cfg = self.mhc_config
        if self.ops.enter_linked is None:
            link = GenericLink()
            agg, h_post, h_res, x_link = link.enter(
                self.ops.enter, x, self.phi, self.alpha, self.bias, cfg.variant,
                cfg.sinkhorn_iters, cfg.norm_eps)
            self._record(h_res)
            return agg, h_post, h_res, x_link, link
        extra = {} if projection is None else {"projection": projection}
        agg, h_post, h_res, x_link, link = self.ops.enter_linked(
            x, self.phi, self.alpha, self.bias, cfg.variant, cfg.sinkhorn_iters, cfg.norm_eps,
            **extra
        )
        self._record(h_res)
        return agg, h_post, h_res, x_link, link

    def _record(self, h_res: Tensor) -> None:
        if self.snapshot_h_res:
            self._snapshot(h_res.detach())
        elif self.recorded_h_res is not None:
            self.recorded_h_res.append(h_res.detach())

    def _snapshot(self, h_res: Tensor) -> None:
        buffer = self.h_res_snapshot
        if buffer is None or buffer.shape != h_res.shape or buffer.device != h_res.device:
            # Allocated in the eager warm-up forwards that precede a capture (shapes are static
            # under graphs), so the buffer is an ordinary allocation, not graph-pool memory.
            buffer = torch.empty_like(h_res)
            self.h_res_snapshot = buffer
        buffer.copy_(h_res)

    def merge(self, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
        """The next residual state ``H_res x + H_post^T y`` (``[..., n, C]``)."""
        return self.ops.post_res_merge(x, y, h_post, h_res)

    def rebuild_merge(self, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor,
                      out: Optional[Tensor] = None) -> Tensor:
        """``merge``'s value without autograd, for the recompute's rebuild of a stream; written
        into ``out`` (which may be ``x``) where the backend has ``merge_into``."""
        with torch.no_grad():
            if out is not None and self.ops.merge_into is not None:
                return self.ops.merge_into(x, y, h_post, h_res, out)
            return self.merge(x, y, h_post, h_res)

    def merge_linked(self, x_link: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor,
                     link: Any) -> Tensor:
        """``merge`` of the pair opened by ``enter_linked``: H_post / H_res enter cut from the
        entry's graph (their gradients travel through ``link``)."""
        if isinstance(link, GenericLink):
            return link.merge(self.ops.post_res_merge, x_link, y, h_post, h_res)
        return self.ops.merge_linked(x_link, y, h_post.detach(), h_res.detach(), link)

    def can_project_for(self, next_hc: Optional["HyperConnection"]) -> bool:
        """Whether this sublayer's merge can make ``next_hc``'s projection (cross-sublayer fusion):
        both use linked ops and this backend has ``merge_linked_project``."""
        return (next_hc is not None and self.ops.merge_linked_project is not None
                and self.ops.enter_linked is not None and next_hc.ops.enter_linked is not None)

    def merge_linked_project(self, x_link: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor,
                             link: Any, next_hc: "HyperConnection") -> Tuple[Tensor, Any]:
        """``merge_linked`` plus ``next_hc``'s projection of the new stream (for its
        ``enter_linked(out, projection=...)``); needs ``can_project_for(next_hc)`` and a link."""
        return self.ops.merge_linked_project(x_link, y, h_post.detach(), h_res.detach(), link,
                                             next_hc.phi)
