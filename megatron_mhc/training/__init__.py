"""The Megatron-LM glue floor: imports the core, never the tools.

``hooks`` (flags, validation, spec wrapping: what the patch set calls), ``patching`` (apply /
check / revert the patch set), ``launch`` (the same hooks at run time, no patch), ``metrics``
(gain metrics in training logs), ``checkpoint_io`` (Megatron torch_dist model state in memory),
``model_from_args`` (rebuild a GPT from stored args), ``small_gpt`` (small GPTs for the demo and
tests), ``cpu`` (Megatron-Core on a CPU-only machine).
"""
