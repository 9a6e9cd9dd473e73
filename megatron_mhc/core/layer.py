"""The mHC transformer layer: Megatron's ``TransformerLayer`` with n residual streams.

Each sublayer F (input-norm + attention, pre-MLP-norm + MLP) becomes

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

The mHC work lives inside Megatron's own sublayer methods, so every caller of them runs it: the
layer's ``forward()``, Megatron-Core's expert-parallel overlap schedule (whose callables call
``_forward_attention``, the pre-MLP norm, the MoE pieces and ``mlp_bda`` one by one, each in its
own schedule node), activation recompute, and inference:

* ``_forward_attention`` does the attention sublayer whole: entry (mappings + pre-aggregate),
  Megatron's attention on the aggregate (its bias-dropout-add swapped for ``get_bias_dropout``, so
  it returns F(.) without a residual), merge;
* the MLP entry runs where Megatron computes the pre-MLP norm: ``_forward_pre_mlp_layernorm``, and
  the ``pre_mlp_layernorm`` module itself (which the EP-overlap callables call directly; an
  n*C-wide input makes it run the entry first, a C-wide one is normed as usual). Both return
  Megatron's ``(norm output, residual)`` pair, the residual being the stream, which Megatron
  hands to ``mlp_bda`` (across schedule nodes the EP-overlap schedule detaches it);
* ``mlp_bda`` is the MLP merge; it finds the mappings its entry made through the stream's storage.
  H_post / H_res do not cross schedule nodes in autograd: their gradients travel through the
  entry/merge link (``megatron_mhc.core.link``), so only the stream does.

The stream expansion happens inside the model's first layer (global layer number 1) and the merge
inside its last (``config.num_layers``), so an unmodified ``GPTModel`` / ``TransformerBlock`` works:
between layers the hidden states are ``[s, b, n*C]``.

Cross-sublayer fusion (ops with ``merge_linked_project``, the Triton set): a sublayer's merge also
makes the next sublayer's norm/projection partials from the stream it writes, so the next entry
does not read the stream for them. Inside a layer the next sublayer is known; across layers the
layer hands its output's partials to the next layer through ``_HANDOFF``, keyed by the output
tensor's identity. The producer learns which layer consumes its output from the first forward in
which the consumer received that very tensor; a consumer that receives another tensor (pipeline
stage boundary, a recompute chunk's saved input, a schedule node's detached copy) projects its
stream itself. Across layers it is off under Megatron's full recompute (a recomputed chunk's first
layer would take the other path, summing in another order) and per-layer CUDA graphs (captured
separately).
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


def _te_graphs(config: TransformerConfig) -> bool:
    """Transformer-Engine's per-layer graphs (``--cuda-graph-impl transformer_engine``): they
    capture ``_forward_attention`` (and, by scope, the MLP side) alone, so no host-side state may
    cross from the attention side to the MLP side."""
    return getattr(config, "cuda_graph_impl", "none") == "transformer_engine"


class _LayerPass:
    """One forward pass through an mHC layer, from its first sublayer method to its last: what
    the attention side leaves for the MLP side (found again through the stream's storage)."""

    __slots__ = ("recompute", "block_input", "projection", "next_layer_hc", "stream_key",
                 "mlp_entry", "deferred_residual")

    def __init__(self, recompute: bool, block_input, projection, next_layer_hc):
        self.recompute = recompute
        self.block_input = block_input
        self.projection = projection
        self.next_layer_hc = next_layer_hc
        self.stream_key: Optional[int] = None
        #: (x, h_post, h_res, link) of the MLP entry, for the MLP merge.
        self.mlp_entry = None
        #: The stream mlp_bda was given when it left the merge to a schedule node of its own.
        self.deferred_residual = None

    def ops_context(self):
        """What the mHC ops of this pass run under: the recompute's saved-stream hooks, or
        nothing."""
        return saved_stream_hooks() if self.recompute else contextlib.nullcontext()


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class MHCEntryNormMixin:
    """Makes a layer's ``pre_mlp_layernorm`` module (a norm, or ``IdentityOp`` where
    Transformer-Engine fuses the norm into fc1) the MLP entry: called on the n*C-wide stream it
    runs the layer's MLP entry and returns ``(norm(aggregate), stream)``, Megatron's
    (output, residual) pair; called on a C-wide tensor (the aggregate, e.g. by Megatron's
    layernorm recompute) it is the plain norm. Parameters and their names are unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        layer = self._mhc_layer()
        if layer is not None and hidden_states.shape[-1] != layer.config.hidden_size:
            if (layer.training and not torch.is_grad_enabled()
                    and getattr(layer, "recompute_pre_mlp_layernorm", False)):
                raise RuntimeError(
                    f"mHC layer {layer.layer_number}: the pre-MLP norm ran on the stream inside "
                    "Megatron's layernorm recompute, which would run the mHC entry without "
                    "autograd: --recompute-modules layernorm with "
                    "--overlap-moe-expert-parallel-comm is not supported with --enable-mhc")
            aggregate, stream = layer._mlp_entry(hidden_states)
            return super().forward(aggregate, *args, **kwargs), stream
        return super().forward(hidden_states, *args, **kwargs)


class _LayerRef:
    """A weak reference from a layer's pre-MLP norm to the layer; a deep copy of the layer points
    its norm's reference at the copy (a plain weakref would keep pointing at the original)."""

    __slots__ = ("ref",)

    def __init__(self, layer):
        self.ref = weakref.ref(layer)

    def __call__(self):
        return self.ref()

    def __deepcopy__(self, memo):
        layer = self.ref()
        return _LayerRef(memo.get(id(layer), layer))


_ENTRY_NORM_CLASSES: dict = {}


def _make_entry_norm(norm: torch.nn.Module, layer) -> None:
    cls = type(norm)
    if not issubclass(cls, MHCEntryNormMixin):
        if cls not in _ENTRY_NORM_CLASSES:
            _ENTRY_NORM_CLASSES[cls] = type(
                "MHCEntry" + cls.__name__, (MHCEntryNormMixin, cls),
                {"__doc__": f"{cls.__name__} that runs the mHC MLP entry on the n*C stream."})
        norm.__class__ = _ENTRY_NORM_CLASSES[cls]
    norm._mhc_layer = _LayerRef(layer)


def _residual_bias_dropout_add(training: bool, fused: bool):
    """``residual + dropout(x + bias)`` (the residual ablation's MLP ``mlp_bda``)."""
    del fused

    def bias_dropout_add(x_with_bias, residual, prob):
        y = _bias_dropout(x_with_bias, None, prob, training)
        return residual + y.to(residual.dtype)

    return bias_dropout_add


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
                _make_entry_norm(self.pre_mlp_layernorm, self)
                self.mlp_bda = self._mlp_merge_bda
        elif self.has_mlp:
            self.mlp_bda = _residual_bias_dropout_add
        #: The next layer's first HyperConnection (a weak reference), learned in the first forward
        #: in which it received this layer's output; its projection is then made by this layer's
        #: last merge (see the module docstring).
        self.mhc_next_entry = None
        self.mhc_fuse_across_layers = _cross_layer_fusion_allowed(self.config)
        #: The pass between this layer's attention side and its MLP merge (one at a time: a
        #: layer's sublayers run in order for one micro-batch before the next one's start).
        self._mhc_open_pass: Optional[_LayerPass] = None
        #: Set inside ``deferred_mlp_merge()``.
        self._mhc_merge_deferred = False

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

    def forward(self, *args: Any, **kwargs: Any):
        """Forward of one layer: ``[s, b, C or n*C] -> ([s, b, n*C or C], context)``; Megatron's
        own ``forward`` (attention, then MLP), skipping a sublayer the layer does not have."""
        hidden_states, context = self._forward_attention(*args, **kwargs)
        if self.has_mlp:
            hidden_states = self._forward_mlp(
                hidden_states, kwargs.get("inference_context", None),
                padding_mask=kwargs.get("padding_mask", None),
                packed_seq_params=kwargs.get("packed_seq_params", None))
        return hidden_states, context

    # ------------------------------------------------------------------ attention side
    def _forward_attention(self, *args: Any, **kwargs: Any):
        """The attention sublayer with its mHC entry and merge (and, in the first layer, the
        stream expansion): ``[s, b, C or n*C] -> ([s, b, n*C], context)`` (C wide after the
        model's last layer when it has no MLP)."""
        hidden_states, args, kwargs = self._split_hidden_states(args, kwargs)
        context = kwargs.get("inference_context", None)
        if context is not None and not context.is_static_batching():
            raise NotImplementedError(
                f"mHC layer {self.layer_number}: Megatron's dynamic inference engine "
                f"({type(context).__name__}) is not supported with mHC; use the static engine "
                "(StaticInferenceContext, megatron_mhc.training.generate)")
        if self.mhc_config.is_residual:
            if not self.has_attention:
                return hidden_states, None
            y, context = super()._forward_attention(hidden_states, *args, **kwargs)
            x = hidden_states + y.to(hidden_states.dtype)
            return make_viewless_tensor(x, requires_grad=x.requires_grad, keep_graph=True), context

        x, layer_pass = self._start_pass(hidden_states)
        context = None
        if self.has_attention:
            aggregate, h_post, h_res, x_link, link = self._enter(self.attn_hc, layer_pass, x)
            y, context = super()._forward_attention(aggregate, *args, **kwargs)
            next_hc = self.mlp_hc if self.has_mlp else layer_pass.next_layer_hc
            if _te_graphs(self.config):
                next_hc = None  # the MLP entry may run outside the attention side's graph
            x, layer_pass.projection = self._merge(
                self.attn_hc, layer_pass, x, x_link, y, h_post, h_res, link, next_hc)
        if not self.has_mlp:
            return self._finish_pass(layer_pass, x), context
        out = make_viewless_tensor(x.flatten(-2), requires_grad=x.requires_grad, keep_graph=True)
        if layer_pass.recompute:
            REGISTRY.retarget(out)  # the MLP entry finds its stream through this tensor
        layer_pass.stream_key = _storage_key(out)
        self._mhc_open_pass = layer_pass
        return out, context

    def _start_pass(self, hidden_states: Tensor):
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
        self._mhc_open_pass = None
        return x, _LayerPass(recompute, block_input, projection, next_layer_hc)

    # ------------------------------------------------------------------------ MLP side
    def _forward_pre_mlp_layernorm(self, hidden_states: Tensor):
        """The MLP entry, then Megatron's pre-MLP norm (and its recompute) on the aggregate:
        ``(norm output, stream)``, the stream being the residual Megatron gives ``mlp_bda``."""
        if self.mhc_config.is_residual or not self.has_mlp:
            return super()._forward_pre_mlp_layernorm(hidden_states)
        aggregate, stream = self._mlp_entry(hidden_states)
        normed = super()._forward_pre_mlp_layernorm(aggregate)
        if isinstance(normed, tuple):
            raise TypeError(f"mHC layer {self.layer_number}: a pre-MLP norm that returns its own "
                            "residual (a fused residual norm) is not supported with mHC")
        return normed, stream

    def _mlp_entry(self, hidden_states: Tensor) -> Tuple[Tensor, Tensor]:
        """``(aggregate, stream)`` of the MLP sublayer for the stream ``hidden_states``
        ``[s, b, n*C]`` that this layer's attention side returned (or a detached copy of it)."""
        layer_pass = self._mhc_open_pass
        if layer_pass is None or layer_pass.stream_key != _storage_key(hidden_states):
            n_wide = self.mhc_config.n * self.config.hidden_size
            if not (_te_graphs(self.config) and getattr(self, "cuda_graphs", None)
                    and hidden_states.shape[-1] == n_wide):
                raise RuntimeError(
                    f"mHC layer {self.layer_number}: the MLP sublayer was given a stream that is "
                    "not this layer's attention output (a caller ran the MLP side without the "
                    "layer's _forward_attention first, and no captured TE graph of the attention "
                    f"side replayed; stream width {hidden_states.shape[-1]}, n*C = {n_wide})")
            # A TE graph replayed the attention side: no host code ran, so no pass was opened.
            # Under TE graphs a pass carries no tensors (no projection crosses, no recompute).
            layer_pass = _LayerPass(False, None, None, None)
            layer_pass.stream_key = _storage_key(hidden_states)
            self._mhc_open_pass = layer_pass
        n, hidden = self.mhc_config.n, self.config.hidden_size
        x = hidden_states.unflatten(-1, (n, hidden))
        aggregate, h_post, h_res, x_link, link = self._enter(self.mlp_hc, layer_pass, x)
        layer_pass.projection = None
        layer_pass.mlp_entry = (x, h_post, h_res, link)
        stream = make_viewless_tensor(x_link.flatten(-2), requires_grad=x_link.requires_grad,
                                      keep_graph=True)
        return aggregate, stream

    def _mlp_merge_bda(self, training: bool, fused: bool):
        """This layer's ``mlp_bda``: bias and dropout on the MLP output, then the mHC merge with
        the stream Megatron passes as the residual (and, in the last layer, the contraction)."""
        del fused

        def merge(mlp_output_with_bias, residual, prob):
            y = _bias_dropout(mlp_output_with_bias, None, prob, training)
            layer_pass = self._mlp_merge_pass(residual)
            if self._mhc_merge_deferred:
                layer_pass.deferred_residual = residual
                return y
            return self._mlp_merge(layer_pass, y, residual, self.mhc_config.overlap)

        return merge

    @contextlib.contextmanager
    def deferred_mlp_merge(self):
        """Inside: ``mlp_bda`` returns ``dropout(MLP output + bias)`` and leaves the merge to
        ``run_deferred_mlp_merge`` (the EP-overlap schedule's ``mhc_post`` node,
        ``megatron_mhc.core.schedule_nodes``)."""
        self._mhc_merge_deferred = True
        try:
            yield
        finally:
            self._mhc_merge_deferred = False

    def run_deferred_mlp_merge(self, y: Tensor) -> Tensor:
        """The MLP merge ``mlp_bda`` left inside ``deferred_mlp_merge``, of ``y`` (its returned
        MLP output, or a detached copy) with the stream it was given: the layer's output."""
        layer_pass = self._mhc_open_pass
        residual = None if layer_pass is None else layer_pass.deferred_residual
        if residual is None:
            raise RuntimeError(
                f"mHC layer {self.layer_number}: no deferred MLP merge to run (mlp_bda must run "
                "inside deferred_mlp_merge() first)")
        layer_pass.deferred_residual = None
        # The schedule node already runs on the high-priority stream with --mhc-overlap.
        return self._mlp_merge(layer_pass, y, residual, high_priority=False)

    def _mlp_merge_pass(self, residual: Tensor) -> _LayerPass:
        layer_pass = self._mhc_open_pass
        if (layer_pass is None or layer_pass.mlp_entry is None
                or layer_pass.stream_key != _storage_key(residual)):
            raise RuntimeError(
                f"mHC layer {self.layer_number}: mlp_bda was called with a residual that is not "
                "the stream of this layer's MLP entry (the pre-MLP norm must run on the stream "
                "first)")
        return layer_pass

    def _mlp_merge(self, layer_pass: _LayerPass, y: Tensor, residual: Tensor,
                   high_priority: bool) -> Tensor:
        self._mhc_open_pass = None
        x, h_post, h_res, link = layer_pass.mlp_entry
        if residual.is_cuda:
            # Megatron's EP-overlap schedule runs this merge in another node than the entry, on
            # another stream (its combine node's communication stream, or the mhc_post node's
            # high-priority one): tell the caching allocator the entry's tensors are used here.
            current = torch.cuda.current_stream(residual.device)
            for tensor in (h_post, h_res, x, residual):
                tensor.record_stream(current)
        x_link = residual.unflatten(-1, (self.mhc_config.n, self.config.hidden_size))
        out, projection = self._merge(
            self.mlp_hc, layer_pass, x, x_link, y, h_post, h_res, link,
            layer_pass.next_layer_hc, high_priority=high_priority)
        return self._finish_pass(layer_pass, out, projection)

    # ------------------------------------------------------------- TE per-layer graphs
    def get_layer_static_inputs(self, seq_length: int, micro_batch_size: int):
        """Megatron's static inputs for this layer's TE graph capture, the hidden states n*C wide
        in the layers after the model's first (they take the streams)."""
        static_inputs = super().get_layer_static_inputs(seq_length, micro_batch_size)
        hidden = static_inputs.get("hidden_states")
        if hidden is not None and not self.is_first_mhc_layer and not self.mhc_config.is_residual:
            static_inputs["hidden_states"] = torch.ones(
                (*hidden.shape[:-1], self.mhc_config.n * hidden.shape[-1]), dtype=hidden.dtype,
                device=hidden.device, requires_grad=hidden.requires_grad)
        return static_inputs

    # ------------------------------------------------------------------------- shared
    def _enter(self, hc: HyperConnection, layer_pass: _LayerPass, x: Tensor):
        """``hc``'s linked entry of the stream ``x`` -> ``(aggregate, H_post, H_res, x_link,
        link)``, with the projection the previous merge made of ``x``, if any."""
        with layer_pass.ops_context():
            return hc.enter_linked(x, layer_pass.projection)

    def _merge(self, hc: HyperConnection, layer_pass: _LayerPass, x: Tensor, x_link: Tensor,
               y: Tensor, h_post: Tensor, h_res: Tensor, link: Any,
               next_hc: Optional[HyperConnection], high_priority: bool = False):
        """``H_res x + H_post^T y`` -> ``(out, projection of out for next_hc or None)``. With
        recompute the merged stream is registered to be rebuilt in the backward from ``x``; with
        ``high_priority`` the merge runs on the high-priority stream
        (``megatron_mhc.core.overlap``)."""
        project = hc.can_project_for(next_hc)

        def merge(x_link, y, h_post, h_res):
            if project:
                return hc.merge_linked_project(x_link, y, h_post, h_res, link, next_hc)
            return hc.merge_linked(x_link, y, h_post, h_res, link), None

        with layer_pass.ops_context():
            if high_priority:
                out, next_projection = run_on_high_priority_stream(merge, x_link, y, h_post, h_res)
            else:
                out, next_projection = merge(x_link, y, h_post, h_res)
        if layer_pass.recompute:
            y_saved, hp_saved, hr_saved = y.detach(), h_post.detach(), h_res.detach()
            REGISTRY.add_merged(
                out, x, lambda parent, buffer: hc.rebuild_merge(parent, y_saved, hp_saved,
                                                                hr_saved, buffer))
        return out, next_projection

    def _finish_pass(self, layer_pass: _LayerPass, x: Tensor, projection: Any = None) -> Tensor:
        """The layer's output from its last stream ``x [s, b, n, C]``: the contraction in the
        model's last layer, else the flattened stream (handed to the next layer)."""
        if layer_pass.block_input is not None:
            REGISTRY.drop(layer_pass.block_input)
        out = self.mhc_ops.merge_streams(x) if self.is_last_mhc_layer else x.flatten(-2)
        out = make_viewless_tensor(out, requires_grad=out.requires_grad, keep_graph=True)
        if not self.is_last_mhc_layer:
            _HANDOFF.put(out, self, projection)
            if layer_pass.recompute:
                REGISTRY.retarget(out)  # the next layer finds its input stream through this tensor
        return out


class MHCTransformerLayer(MHCLayerMixin, TransformerLayer):
    """Megatron-Core ``TransformerLayer`` with manifold-constrained hyper-connections."""
