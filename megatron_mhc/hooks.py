"""The stable name that patched Megatron-LM files import (``from megatron_mhc import hooks``).

The patch set (``patches/core_v0.19.0``) calls ``add_mhc_args``, ``validate_mhc_args``,
``apply_mhc_to_spec``, ``after_train_step``, ``pipeline_hidden_size`` and ``add_mhc_post_node``
through this module, so a tree patched once keeps working whatever the package layout behind it.
The implementation lives in ``megatron_mhc.training.hooks`` (the Megatron-LM glue floor); nothing
else should import this name.
"""

from megatron_mhc.training.hooks import (  # noqa: F401 - re-exported for patched Megatron-LM trees
    add_mhc_args,
    add_mhc_post_node,
    after_train_step,
    apply_mhc_to_spec,
    pipeline_hidden_size,
    validate_mhc_args,
)

__all__ = [
    "add_mhc_args",
    "add_mhc_post_node",
    "after_train_step",
    "apply_mhc_to_spec",
    "pipeline_hidden_size",
    "validate_mhc_args",
]
