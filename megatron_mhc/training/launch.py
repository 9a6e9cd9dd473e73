"""Run an unpatched Megatron-LM script with the mHC hooks installed at run time.

    python -m megatron_mhc.training.launch pretrain_gpt.py --enable-mhc --mhc-expansion-rate 4 <args>

For users who cannot patch their Megatron-LM tree. It installs the same hooks as the patch set
(``megatron_mhc.training.hooks``) by wrapping module attributes before the script runs:

* ``megatron.training.arguments.add_megatron_arguments`` / ``validate_args``: the ``--mhc-*``
  flags and their validation;
* ``GPTModel`` / ``HybridModel`` as the model builders (``megatron.training.models.gpt`` /
  ``.hybrid``, ``gpt_builders`` / ``hybrid_builders``) see them: the layer spec is wrapped;
* ``megatron.training.training.train_step``: the gain metrics after each step;
* ``TransformerLayerSchedulePlan._build_callable_nodes`` (the EP-overlap schedule): an mHC MoE
  layer's MLP merge as a node of its own (``megatron_mhc.core.schedule_nodes``).

One difference from the patch set: the pipeline schedules are not patched, so with pipeline
parallelism the mHC model runs in Megatron's ``variable_seq_lengths`` mode (each stage-to-stage
tensor is preceded by a small shape message).
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys
from typing import List


def _wrap_model_class(module, name: str, spec_kwarg: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def build(*args, **kwargs):
        from megatron.training.global_vars import get_args

        from megatron_mhc.training import hooks

        megatron_args = get_args()
        config = kwargs.get("config", args[0] if args else None)
        if spec_kwarg in kwargs and hooks.mhc_config_from_args(megatron_args) is not None:
            kwargs[spec_kwarg] = hooks.apply_mhc_to_spec(kwargs[spec_kwarg], megatron_args, config)
            if getattr(config, "pipeline_model_parallel_size", 1) > 1:
                config.variable_seq_lengths = True
        return original(*args, **kwargs)

    setattr(module, name, build)


def install_hooks(script_dir: str) -> None:
    """Wrap Megatron-LM's functions with the mHC hooks (idempotent per process)."""
    # The script's tree first, as ``python pretrain_gpt.py`` would have it, before megatron is
    # imported, so that tree's megatron package (and gpt_builders etc.) is the one that runs.
    sys.path.insert(0, script_dir)
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    from megatron_mhc.core.schedule_nodes import hook_schedule_plans
    from megatron_mhc.training import hooks

    if getattr(arguments, "_mhc_launch_hooks", False):
        return
    if getattr(arguments, "mhc_hooks", None) is not None:
        raise SystemExit("megatron_mhc.training.launch: this Megatron-LM tree already has the megatron-mhc "
                         "patch set applied; run the script directly")
    add_original, validate_original = arguments.add_megatron_arguments, arguments.validate_args

    def add_megatron_arguments(parser):
        return hooks.add_mhc_args(add_original(parser))

    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's own signature
        result = validate_original(args, defaults)
        hooks.validate_mhc_args(args)
        return result

    step_original = training.train_step

    @functools.wraps(step_original)
    def train_step(*args, **kwargs):
        result = step_original(*args, **kwargs)
        model = kwargs.get("model", args[2] if len(args) > 2 else None)
        iteration = kwargs.get("iteration")
        if model is not None and iteration is not None:
            hooks.after_train_step(model, iteration + 1)
        return result

    arguments.add_megatron_arguments = add_megatron_arguments
    arguments.validate_args = validate_args
    training.train_step = train_step
    for module_name, class_name, spec_kwarg in (
        ("megatron.training.models.gpt", "GPTModel", "transformer_layer_spec"),
        ("megatron.training.models.hybrid", "HybridModel", "hybrid_stack_spec"),
        ("gpt_builders", "GPTModel", "transformer_layer_spec"),
        ("hybrid_builders", "HybridModel", "hybrid_stack_spec"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        _wrap_model_class(module, class_name, spec_kwarg)
    hook_schedule_plans()
    arguments._mhc_launch_hooks = True


def main(argv: List[str]) -> int:
    """``python -m megatron_mhc.training.launch SCRIPT [ARGS...]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"megatron_mhc.training.launch: {argv[0]} is not a file (expected e.g. "
              "<Megatron-LM>/pretrain_gpt.py)", file=sys.stderr)
        return 2
    install_hooks(os.path.dirname(script))
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
