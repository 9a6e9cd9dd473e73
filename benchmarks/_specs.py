"""Layer specs shared by the GPU benchmarks: Megatron's local GPT spec with SDPA attention."""

from __future__ import annotations

import dataclasses

import torch


def sdpa_gpt_layer_spec(mhc_config=None):
    """Megatron's local GPT layer spec (RMSNorm) with PyTorch SDPA as core attention, optionally
    turned into the mHC spec."""
    from _sdpa_attention import SDPACoreAttention
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_mhc.core.specs import with_mhc

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = dataclasses.replace(
        spec.submodules.self_attention,
        submodules=dataclasses.replace(spec.submodules.self_attention.submodules,
                                       core_attention=SDPACoreAttention))
    spec = dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))
    return with_mhc(spec, mhc_config) if mhc_config is not None else spec


def gpt_layer_spec(impl: str, mhc_config=None):
    """The GPT layer spec of ``impl`` (``te``: Transformer-Engine's; ``local``: Megatron's local
    spec with SDPA attention), turned into the mHC spec when ``mhc_config`` is given."""
    if impl == "local":
        return sdpa_gpt_layer_spec(mhc_config)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec

    if mhc_config is None:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_with_mhc_spec(mhc_config, use_transformer_engine=True)


#: Defaults of ``add_block_shape_arguments``: the 4-layer C = 4096 block of issue 14.
BLOCK_SHAPE_DEFAULTS = dict(hidden=4096, heads=32, seq=4096, micro_batch=2, layers=4, n=4)


def add_block_shape_arguments(parser, **defaults) -> None:
    """The block-shape options the benchmarks share: --hidden, --heads, --seq, --micro-batch,
    --layers, --n, with ``BLOCK_SHAPE_DEFAULTS`` updated by ``defaults``."""
    unknown = set(defaults) - set(BLOCK_SHAPE_DEFAULTS)
    if unknown:
        raise TypeError(f"add_block_shape_arguments: unknown defaults {sorted(unknown)}")
    for name, default in {**BLOCK_SHAPE_DEFAULTS, **defaults}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def add_recompute_rebuild_argument(parser) -> None:
    """--recompute-rebuild: the ``MHCConfig.recompute_rebuild`` policies to run each L_r with."""
    from megatron_mhc.core.config import RECOMPUTE_REBUILDS

    parser.add_argument("--recompute-rebuild", nargs="+", default=["auto"],
                        choices=RECOMPUTE_REBUILDS,
                        help="the rebuild policies to run each --recompute-blocks L_r with "
                             "(MHCConfig.recompute_rebuild; default auto)")


def bf16_config(**kwargs):
    """A bf16 ``TransformerConfig`` without the CUDA-extension fusions (no TE / Apex needed)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        normalization="RMSNorm", bf16=True, params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    base.update(kwargs)
    return TransformerConfig(**base)


def init_single_gpu(port: str = "29533") -> None:
    """One-process NCCL group and Megatron model-parallel state on GPU 0 (seeded)."""
    import os

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
