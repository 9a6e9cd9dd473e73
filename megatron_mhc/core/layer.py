"""The mHC transformer layer: Megatron's ``TransformerLayer`` with n residual streams.

Each sublayer F (input-norm + attention, pre-MLP-norm + MLP) becomes

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

The layer reuses Megatron's own ``_forward_attention`` / ``_forward_mlp`` unchanged (so layernorm
recompute, MLP recompute and the MoE paths keep working) and only swaps the two bias-dropout-add
modules for ``get_bias_dropout`` — bias and dropout without the residual add — so those methods
return F(.) alone, and the mHC merge does the residual mixing. Called from anywhere but this
layer's ``forward()`` they raise: such a caller would skip the streams and merges
(``megatron_mhc.core.compat`` lists the Megatron features refused for that reason).

The stream expansion happens inside the model's first layer (global layer number 1) and the merge
inside its last (``config.num_layers``), so an unmodified ``GPTModel`` / ``TransformerBlock`` works:
between layers the hidden states are ``[s, b, n*C]``.

Cross-sublayer fusion (ops with ``merge_linked_project``, the Triton set): a sublayer's merge also
makes the next sublayer's norm/projection partials from the stream it writes, so the next entry
does not read the stream for them. Inside a layer the next sublayer is known; across layers the
layer hands its output's partials to the next layer through ``_HANDOFF``, keyed by the output
tensor's identity. The producer learns which layer consumes its output from the first forward in
which the consumer received that very tensor; a consumer that receives another tensor (pipeline
stage boundary, a recompute chunk's saved input) projects its stream itself. Across layers it is
off under Megatron's full recompute (a recomputed chunk's first layer would take the other path,
summing in another order) and per-layer CUDA graphs (captured separately).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional, Tuple

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from megatron_mhc.core.backends import get_backend_ops, resolve_backend
from megatron_mhc.core.compat import refused_feature_problems
from megatron_mhc.core.config import MHCConfig
from megatron_mhc.core.hyper_connection import HyperConnection
from megatron_mhc.core.overlap import run_on_high_priority_stream
from megatron_mhc.core.pipeline import PIPELINE_STREAMS_ATTR, schedules_are_hooked
from megatron_mhc.core.recompute import REGISTRY, optimal_recompute_block, saved_stream_hooks


def _bias_dropout(x_with_bias, residual, prob: float, training: bool) -> Tensor:
    del residual  # mHC mixes the residual itself (post/res merge)
    x, bias = x_with_bias
    if bias is not None:
        x = x + bias
    return torch.nn.functional.dropout(x, p=prob, training=training)


def get_bias_dropout(training: bool, fused: bool):
    """Drop-in for Megatron's ``get_bias_dropout_add`` that returns ``dropout(x + bias)``.

    Same calling convention ``f(x_with_bias, residual, prob)``; the residual is ignored.
    """
    del fused

    def bias_dropout(x_with_bias, residual, prob):
        return _bias_dropout(x_with_bias, residual, prob, training)

    return bias_dropout


def check_transformer_config(config: TransformerConfig, mhc_config: MHCConfig) -> None:
    """Refuse Megatron features the mHC layer does not support, naming the flag to change."""
    problems = refused_feature_problems(config, mhc_config)
    if (
        not mhc_config.is_residual
        and getattr(config, "pipeline_model_parallel_size", 1) > 1
        and not getattr(config, "variable_seq_lengths", False)
        and not _pipeline_shapes_hooked(config, mhc_config)
    ):
        # Stages exchange [s, b, n*C], not Megatron's fixed [s, b, C]: either the patched
        # schedules size them (patches/core_v0.19.0) or Megatron's own variable_seq_lengths mode
        # sends each tensor's shape before the tensor.
        problems.append(
            "--pipeline-model-parallel-size > 1 with mHC needs the megatron-mhc patch set "
            "(megatron-mhc patch apply <Megatron-LM>) or --variable-seq-lengths "
            "(TransformerConfig.variable_seq_lengths=True): stages exchange [s, b, n*C] tensors"
        )
    if problems:
        raise ValueError("mHC layer: " + "; ".join(problems))


def _pipeline_shapes_hooked(config: TransformerConfig, mhc_config: MHCConfig) -> bool:
    return getattr(config, PIPELINE_STREAMS_ATTR, None) == mhc_config.n and schedules_are_hooked()


class _StreamHandoff:
    """The projection partials a layer's last merge made of its output for the next layer's first
    entry, keyed by the output tensor's identity (weakly held; taken once)."""

    def __init__(self):
        self.put(None, None, None)

    def put(self, stream: Optional[Tensor], producer, projection) -> None:
        self._stream = None if stream is None else weakref.ref(stream)
        self._producer = None if producer is None else weakref.ref(producer)
        self._projection = projection

    def take(self, hidden_states: Tensor):
        """``(producer layer, projection or None)`` if ``hidden_states`` is the tensor put last,
        else ``(None, None)``; the handoff is empty afterwards either way."""
        stream = None if self._stream is None else self._stream()
        producer = None if self._producer is None else self._producer()
        projection = self._projection
        self.put(None, None, None)
        if stream is None or stream is not hidden_states:
            return None, None
        return producer, projection


_HANDOFF = _StreamHandoff()


def _cross_layer_fusion_allowed(config: TransformerConfig) -> bool:
    return (getattr(config, "recompute_granularity", None) != "full"
            and getattr(config, "cuda_graph_impl", "none") in (None, "none"))


class MHCLayerMixin:
    """Turns a Megatron ``TransformerLayer`` (or subclass) into an mHC layer.

    Use as the first base: ``class X(MHCLayerMixin, TransformerLayer)``. Needs ``mhc_config`` as
    a constructor keyword (given through the layer spec's ``params``).
    """

    def __init__(self, *args, mhc_config: Optional[MHCConfig] = None, **kwargs):
        if kwargs.get("is_mtp_layer", False):
            raise ValueError(
                "mHC layer inside a multi-token-prediction block (--mtp-num-layers): the MTP "
                "block takes the decoder's merged C-wide hidden state and runs Megatron's plain "
                "layers; build its spec from Megatron's own layer spec "
                "(get_gpt_mtp_block_spec(config, <plain layer spec>, ...)), not the mHC spec")
        super().__init__(*args, **kwargs)
        #: How many of this layer's forward() calls are running (the sublayer methods refuse
        #: callers outside them).
        self._mhc_forward_depth = 0
        self.mhc_config = mhc_config if mhc_config is not None else MHCConfig()
        check_transformer_config(self.config, self.mhc_config)
        self.mhc_backend = resolve_backend(self.mhc_config.kernel_backend)
        ops = get_backend_ops(self.mhc_backend)
        self.mhc_ops = ops
        self.is_first_mhc_layer = self.layer_number == 1
        self.is_last_mhc_layer = self.layer_number == self.config.num_layers
        block = self.mhc_config.recompute_block
        if block == 0:
            stage_layers = self.config.num_layers // max(
                1, getattr(self.config, "pipeline_model_parallel_size", 1) or 1)
            block = optimal_recompute_block(self.mhc_config.n, max(1, stage_layers))
        #: L_r: layers per mHC recompute block (None: every stream is stored).
        self.mhc_recompute_block = None if self.mhc_config.is_residual else block
        # HybridModel builds attention-only and MLP-only TransformerLayers (the other sublayer
        # is an IdentityOp): only the sublayers present get mappings and run.
        self.has_attention = not isinstance(self.self_attention, IdentityOp)
        self.has_mlp = not isinstance(self.mlp, IdentityOp)
        self.attn_hc = None
        self.mlp_hc = None
        if not self.mhc_config.is_residual:
            if self.has_attention:
                self.attn_hc = HyperConnection(self.config, self.mhc_config, ops, self.tp_group)
                self.attn_hc.sublayer_index = 2 * (self.layer_number - 1)
            if self.has_mlp:
                self.mlp_hc = HyperConnection(self.config, self.mhc_config, ops, self.tp_group)
                self.mlp_hc.sublayer_index = 2 * (self.layer_number - 1) + 1
        #: The next layer's first HyperConnection (a weak reference), learned in the first forward
        #: in which it received this layer's output; its projection is then made by this layer's
        #: last merge (see the module docstring).
        self.mhc_next_entry = None
        self.mhc_fuse_across_layers = _cross_layer_fusion_allowed(self.config)

    def _first_hc(self) -> Optional[HyperConnection]:
        return self.attn_hc if self.attn_hc is not None else self.mlp_hc

    def _take_handoff(self, hidden_states: Tensor):
        """The projection the previous layer made of ``hidden_states`` for this layer, if any;
        teaches the previous layer that this layer consumes its output."""
        producer, projection = _HANDOFF.take(hidden_states)
        first = self._first_hc()
        if producer is None or producer is self or first is None or not self.mhc_fuse_across_layers:
            return None
        current = producer.mhc_next_entry() if producer.mhc_next_entry is not None else None
        if current is not first:
            producer.mhc_next_entry = weakref.ref(first)
        if projection is None or projection.phi is not first.phi:
            return None
        return projection

    def _split_hidden_states(self, args, kwargs) -> Tuple[Tensor, tuple, dict]:
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            return kwargs.pop("hidden_states"), args, kwargs
        return args[0], args[1:], kwargs

    def _forward_attention(self, *args: Any, **kwargs: Any):
        """Megatron's attention sublayer on the mHC aggregate; only from this layer's forward()."""
        self._refuse_outside_forward("_forward_attention")
        return super()._forward_attention(*args, **kwargs)

    def _forward_mlp(self, *args: Any, **kwargs: Any):
        """Megatron's MLP / MoE sublayer on the mHC aggregate; only from this layer's forward()."""
        self._refuse_outside_forward("_forward_mlp")
        return super()._forward_mlp(*args, **kwargs)

    def _refuse_outside_forward(self, method: str) -> None:
        # Callers that run the sublayer methods themselves (the EP-overlap schedule's callables,
        # TE's per-layer graph capture) would skip the streams and merges: a model without mHC
        # and without a residual. They are refused by flag (core.compat); this catches the rest.
        if not self._mhc_forward_depth:
            raise RuntimeError(
                f"mHC layer {self.layer_number}: TransformerLayer.{method} was called from outside "
                "the layer's forward(), which does the mHC stream work; this caller (e.g. "
                "--overlap-moe-expert-parallel-comm's schedule or --cuda-graph-impl "
                "transformer_engine) would train a model without mHC. Call the layer itself.")

    def forward(self, *args: Any, **kwargs: Any):
        """Forward of one layer: ``[s, b, C or n*C] -> ([s, b, n*C or C], context)``."""
        context = kwargs.get("inference_context", None)
        if context is not None and not context.is_static_batching():
            raise NotImplementedError(
                f"mHC layer {self.layer_number}: Megatron's dynamic inference engine "
                f"({type(context).__name__}) is not supported with mHC; use the static engine "
                "(StaticInferenceContext, megatron_mhc.training.generate)")
        self._mhc_forward_depth += 1
        try:
            return self._forward_streams(*args, **kwargs)
        finally:
            self._mhc_forward_depth -= 1

    def _forward_streams(self, *args: Any, **kwargs: Any):
        hidden_states, args, kwargs = self._split_hidden_states(args, kwargs)
        mlp_kwargs = dict(
            inference_context=kwargs.get("inference_context", None),
            padding_mask=kwargs.get("padding_mask", None),
            packed_seq_params=kwargs.get("packed_seq_params", None),
        )
        if self.mhc_config.is_residual:
            x, context = hidden_states, None
            if self.has_attention:
                y, context = self._forward_attention(x, *args, **kwargs)
                x = x + y.to(x.dtype)
            if self.has_mlp:
                x = x + self._forward_mlp(x, **mlp_kwargs).to(x.dtype)
            return make_viewless_tensor(x, requires_grad=x.requires_grad, keep_graph=True), context

        n, hidden = self.mhc_config.n, self.config.hidden_size
        if self.is_first_mhc_layer:
            if hidden_states.shape[-1] != hidden:
                raise ValueError(
                    f"first mHC layer expects [s, b, {hidden}] input, got {tuple(hidden_states.shape)}"
                )
            x = self.mhc_ops.expand_streams(hidden_states, n)
        else:
            if hidden_states.shape[-1] != n * hidden:
                raise ValueError(
                    f"mHC layer {self.layer_number} expects [s, b, n*C = {n * hidden}] input, "
                    f"got {tuple(hidden_states.shape)}"
                )
            x = hidden_states.unflatten(-1, (n, hidden))
        projection = None if self.is_first_mhc_layer else self._take_handoff(hidden_states)
        next_layer_hc = None  # the next layer's entry, if this layer's last merge projects for it
        if (self.mhc_next_entry is not None and self.mhc_fuse_across_layers
                and not self.is_last_mhc_layer):
            next_layer_hc = self.mhc_next_entry()

        recompute = (
            self.mhc_recompute_block is not None and self.training and torch.is_grad_enabled()
        )
        block_input = None
        if recompute:
            starts_block = (self.layer_number - 1) % self.mhc_recompute_block == 0
            if starts_block or not REGISTRY.is_live(x):
                block_input = REGISTRY.add_block_input(x, self.mhc_config.recompute_rebuild)
        context = None
        if self.has_attention:
            x, context, projection = self._sublayer(
                self.attn_hc, x, recompute, lambda a: self._forward_attention(a, *args, **kwargs),
                projection=projection,
                next_hc=self.mlp_hc if self.has_mlp else next_layer_hc)
        if self.has_mlp:
            x, _, projection = self._sublayer(
                self.mlp_hc, x, recompute, lambda a: (self._forward_mlp(a, **mlp_kwargs), None),
                high_priority=self.mhc_config.overlap, projection=projection,
                next_hc=next_layer_hc)
        if block_input is not None:
            REGISTRY.drop(block_input)

        if self.is_last_mhc_layer:
            out = self.mhc_ops.merge_streams(x)
        else:
            out = x.flatten(-2)
        out = make_viewless_tensor(out, requires_grad=out.requires_grad, keep_graph=True)
        if not self.is_last_mhc_layer:
            _HANDOFF.put(out, self, projection)
        if recompute and not self.is_last_mhc_layer:
            REGISTRY.retarget(out)  # the next layer finds its input stream through this tensor
        return out, context


    def _sublayer(self, hc: HyperConnection, x: Tensor, recompute: bool, run_sublayer,
                  high_priority: bool = False, projection: Any = None,
                  next_hc: Optional[HyperConnection] = None):
        """``H_res x + H_post^T F(H_pre x)`` for one sublayer -> ``(out, context, projection of
        out for next_hc or None)``; ``projection``: the previous merge's projection of x for
        ``hc``. With recompute, the stream x is saved as a token and its successor registered to
        be rebuilt in the backward. With ``high_priority`` the merge runs on the high-priority
        stream (``megatron_mhc.core.overlap``)."""
        mhc_ops_context = saved_stream_hooks if recompute else contextlib.nullcontext
        with mhc_ops_context():
            aggregate, h_post, h_res, x_link, link = hc.enter_linked(x, projection)
        y, context = run_sublayer(aggregate)
        project = link is not None and hc.can_project_for(next_hc)

        def merge(x_link, y, h_post, h_res):
            if project:
                return hc.merge_linked_project(x_link, y, h_post, h_res, link, next_hc)
            return hc.merge_linked(x_link, y, h_post, h_res, link), None

        with mhc_ops_context():
            if high_priority:
                out, next_projection = run_on_high_priority_stream(merge, x_link, y, h_post, h_res)
            else:
                out, next_projection = merge(x_link, y, h_post, h_res)
        if recompute:
            y_saved, hp_saved, hr_saved = y.detach(), h_post.detach(), h_res.detach()
            REGISTRY.add_merged(
                out, x, lambda parent, buffer: hc.rebuild_merge(parent, y_saved, hp_saved,
                                                                hr_saved, buffer))
        return out, context, next_projection


class MHCTransformerLayer(MHCLayerMixin, TransformerLayer):
    """Megatron-Core ``TransformerLayer`` with manifold-constrained hyper-connections."""
