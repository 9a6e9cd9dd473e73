"""The patch set CLI (apply / check / revert, refusals, all-or-nothing) and the Megatron hooks
(flags, validation, spec wrapping, pipeline width)."""

import argparse
import difflib
import hashlib
import json
import os
from pathlib import Path

import pytest

from megatron_mhc.training import hooks
from megatron_mhc.training.patching import (
    STATE_APPLIED,
    STATE_CONFLICTING,
    STATE_NOT_APPLIED,
    PatchError,
    PatchSet,
    apply_hunks,
)

PRISTINE = {
    "pretrain_gpt.py": "print('train')\n",
    "megatron/core/package_info.py": "MAJOR = 0\nMINOR = 19\nPATCH = 1\n",
    "a.py": "".join(f"line {i}\n" for i in range(30)),
    "pkg/b.py": "import os\n\n\ndef f():\n    return 1\n",
}
PATCHED = {
    "a.py": PRISTINE["a.py"].replace("line 3\n", "line 3\nhook()  # megatron-mhc\n").replace(
        "line 20\n", "line 20 changed\n"),
    "pkg/b.py": PRISTINE["pkg/b.py"].replace("    return 1\n", "    hook()\n    return 1\n"),
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_tree(root: Path, files: dict) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def patch_set(tmp_path):
    """A synthetic patch set over a synthetic tree (same format as patches/core_v0.19.0)."""
    directory = tmp_path / "patchset"
    directory.mkdir()
    diff = ""
    for name, new in PATCHED.items():
        diff += f"diff --git a/{name} b/{name}\n"
        diff += "".join(difflib.unified_diff(
            PRISTINE[name].splitlines(True), new.splitlines(True), f"a/{name}", f"b/{name}"))
    (directory / "megatron-mhc.patch").write_text(diff)
    (directory / "pin.json").write_text(json.dumps({"tag": "core_v0.19.0", "commit": "0" * 40,
        "files": {n: {"pristine_sha256": _sha(PRISTINE[n]), "patched_sha256": _sha(PATCHED[n])}
                  for n in PATCHED}}))
    tree = tmp_path / "Megatron-LM"
    _write_tree(tree, PRISTINE)
    return PatchSet(directory), tree


def test_apply_check_revert(patch_set):
    patches, tree = patch_set
    original = _snapshot(tree)
    assert patches.status(tree).state == STATE_NOT_APPLIED
    patches.apply(tree)
    assert patches.status(tree).state == STATE_APPLIED
    for name, text in PATCHED.items():
        assert (tree / name).read_text() == text
    assert "already applied" in patches.apply(tree)
    patches.revert(tree)
    assert _snapshot(tree) == original


def test_foreign_tree_is_refused_and_left_untouched(patch_set):
    patches, tree = patch_set
    # An edit inside a hunk's context: the hunks no longer match anywhere.
    (tree / "pkg/b.py").write_text(PRISTINE["pkg/b.py"].replace("    return 1\n", "    return 2\n"))
    before = _snapshot(tree)
    assert patches.status(tree).state == STATE_CONFLICTING
    with pytest.raises(PatchError, match=r"Megatron-Core 0\.19\.1.*pkg/b\.py \(foreign\).*core_v0\.19\.0"):
        patches.apply(tree)
    assert _snapshot(tree) == before


def test_unpinned_tree_of_another_release_line_is_refused(patch_set):
    patches, tree = patch_set
    (tree / "pkg/b.py").write_text(PRISTINE["pkg/b.py"] + "# local change\n")
    (tree / "megatron/core/package_info.py").write_text("MAJOR = 0\nMINOR = 20\nPATCH = 0\n")
    before = _snapshot(tree)
    status = patches.status(tree)
    assert status.state == STATE_NOT_APPLIED
    assert status.files["pkg/b.py"] == "pristine, not pinned"
    with pytest.raises(PatchError, match=r"Megatron-Core 0\.20\.0.*pkg/b\.py.*only in a "
                                         r"Megatron-Core 0\.19\.x tree"):
        patches.apply(tree)
    assert _snapshot(tree) == before


def test_a_later_0_19_release_whose_hunks_match_is_patched_and_reverted(patch_set):
    """Lines added above and between the hunks (as a 0.19.x release might): the hunks apply at
    their new places, check reports applied, revert restores every byte."""
    patches, tree = patch_set
    shifted = "# release notes\n# more\n" + PRISTINE["a.py"].replace("line 10\n", "line 10\nnew\n")
    (tree / "a.py").write_text(shifted)
    (tree / "megatron/core/package_info.py").write_text("MAJOR = 0\nMINOR = 19\nPATCH = 2\n")
    before = _snapshot(tree)
    assert patches.status(tree).files["a.py"] == "pristine, not pinned"
    patches.apply(tree)
    status = patches.status(tree)
    assert status.state == STATE_APPLIED and status.files["a.py"] == "patched, not pinned"
    text = (tree / "a.py").read_text()
    assert "line 3\nhook()  # megatron-mhc\n" in text and "line 20 changed\n" in text
    assert text.startswith("# release notes\n") and "line 10\nnew\n" in text
    patches.revert(tree)
    assert _snapshot(tree) == before


def test_not_a_megatron_tree(patch_set, tmp_path):
    patches, _ = patch_set
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PatchError, match="not a Megatron-LM checkout"):
        patches.apply(empty)


def test_failed_write_leaves_tree_byte_identical(patch_set, monkeypatch):
    import megatron_mhc.training.patching as patching

    patches, tree = patch_set
    before = _snapshot(tree)
    real_write, calls = patching._atomic_write, []

    def failing_write(target, data):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(target, data)

    monkeypatch.setattr(patching, "_atomic_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        patches.apply(tree)
    assert _snapshot(tree) == before


def test_partially_patched_tree_is_conflicting(patch_set):
    patches, tree = patch_set
    (tree / "a.py").write_text(PATCHED["a.py"])
    status = patches.status(tree)
    assert status.state == STATE_CONFLICTING
    with pytest.raises(PatchError):
        patches.revert(tree)


def test_real_patch_set_matches_the_installed_megatron_core():
    """The shipped patch set applies exactly to megatron-core 0.19.0's schedules.py (the one
    target file the PyPI package has) and reverts to it."""
    import megatron.core.pipeline_parallel.schedules as schedules

    patches = PatchSet()
    assert patches.pin["tag"] == "core_v0.19.0"
    path = "megatron/core/pipeline_parallel/schedules.py"
    source = Path(schedules.__file__).read_text()
    assert _sha(source) == patches.pin["files"][path]["pristine_sha256"]
    patched = apply_hunks(source, patches.hunks[path])
    assert _sha(patched) == patches.pin["files"][path]["patched_sha256"]
    assert apply_hunks(patched, patches.hunks[path], reverse=True) == source
    # The schedule-plan hunk applies to the installed file too (0.19.0's, or a later 0.19.x one
    # whose hunks match) and reverts to it.
    import megatron.core.models.common.model_chunk_schedule_plan as plan_module

    path = "megatron/core/models/common/model_chunk_schedule_plan.py"
    source = Path(plan_module.__file__).read_text()
    patched = apply_hunks(source, patches.hunks[path], exact=False)
    assert "_mhc_add_schedule_nodes(self, event, comp_stream, extra_args)" in patched
    assert apply_hunks(patched, patches.hunks[path], reverse=True, exact=False) == source
    # Only hook lines: every added line is marked.
    added = [t for hunks in patches.hunks.values() for h in hunks for m, t in h.lines if m == "+"]
    assert all("megatron-mhc" in t or "_mhc_pipeline_hidden_size" in t or "mhc_hooks" in t
               or not t.strip() for t in added), added


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"),
                    reason="set MEGATRON_LM_DIR to a core_v0.19.0 checkout to run")
def test_real_patch_set_on_a_checkout(tmp_path):
    import shutil

    tree = tmp_path / "Megatron-LM"
    src = Path(os.environ["MEGATRON_LM_DIR"])
    patches = PatchSet()
    for name in list(patches.pin["files"]) + ["pretrain_gpt.py", "megatron/core/package_info.py"]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, tree / name)
    if patches.status(tree).state == STATE_APPLIED:
        patches.revert(tree)
    before = _snapshot(tree)
    patches.apply(tree)
    assert patches.status(tree).state == STATE_APPLIED
    patches.revert(tree)
    assert _snapshot(tree) == before


def test_patch_cli_exit_codes(patch_set, tmp_path, capsys):
    from megatron_mhc.tools.cli import main

    assert main(["patch", "bogus", str(tmp_path)]) == 2
    assert main(["patch", "check", str(tmp_path / "missing")]) == 2
    assert main(["patch", "check", str(tmp_path)]) == 2  # conflicting: no target files
    assert "missing" in capsys.readouterr().out


# ---------------------------------------------------------------------------- hooks


def _parse(argv):
    parser = hooks.add_mhc_args(argparse.ArgumentParser())
    parser.add_argument("--cuda-graph-impl", default="none")
    parser.add_argument("--cuda-graph-modules", nargs="*", default=None)
    parser.add_argument("--mtp-num-layers", type=int, default=None)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return parser.parse_args(argv)


@pytest.mark.parametrize("impl", ["local"])
def test_cuda_graph_impls_that_capture_the_layer_forward_are_accepted(impl):
    for argv in (["--enable-mhc"], ["--enable-mhc", "--mhc-variant", "hc"],
                 ["--enable-mhc", "--mhc-variant", "residual"]):
        args = _parse(argv + ["--cuda-graph-impl", impl])
        hooks.validate_mhc_args(args)
        assert args.cuda_graph_impl == impl


def test_te_graphs_are_accepted_for_the_mhc_variant_whole_layer_or_attention():
    for scope in ([], ["--cuda-graph-modules", "attn"]):
        args = _parse(["--enable-mhc", "--cuda-graph-impl", "transformer_engine"] + scope)
        hooks.validate_mhc_args(args)
    with pytest.raises(ValueError, match="--mhc-variant hc is not supported"):
        hooks.validate_mhc_args(_parse(["--enable-mhc", "--mhc-variant", "hc",
                                        "--cuda-graph-impl", "transformer_engine"]))


@pytest.mark.parametrize("scope, why", [
    ("moe_router", "H_post / H_res would have to leave the graph"),
    ("moe_preprocess", "H_post / H_res would have to leave the graph"),
    ("moe", r"\(not run\)"), ("mlp", r"\(not run\)")])
def test_te_graph_scopes_inside_the_mlp_are_refused_with_their_reason(scope, why):
    """The scopes that end the graph inside the MoE layer are refused for what would break (the
    MLP entry's mappings have no way out of Megatron's partial-MoE replay); the others as not
    run."""
    args = _parse(["--enable-mhc", "--cuda-graph-impl", "transformer_engine",
                   "--cuda-graph-modules", scope])
    with pytest.raises(ValueError, match=f"--cuda-graph-modules {scope} .*{why}"):
        hooks.validate_mhc_args(args)


def test_flags_build_the_config():
    args = _parse(["--enable-mhc", "--mhc-expansion-rate", "2", "--mhc-recompute-block", "auto",
                   "--mhc-variant", "hc", "--mhc-sinkhorn-iters", "7"])
    hooks.validate_mhc_args(args)
    config = hooks.mhc_config_from_args(args)
    assert (config.n, config.recompute_block, config.variant, config.sinkhorn_iters) == (2, 0, "hc", 7)
    assert config.recompute_rebuild == "auto"
    args = _parse(["--enable-mhc", "--mhc-recompute-block", "2", "--mhc-recompute-rebuild",
                   "sublayer"])
    hooks.validate_mhc_args(args)
    assert hooks.mhc_config_from_args(args).recompute_rebuild == "sublayer"
    assert hooks.mhc_config_from_args(_parse([])) is None


def test_overlap_flag_turns_on_megatrons_warmup_flush_p2p_overlap_with_vpp():
    args = _parse(["--enable-mhc", "--mhc-overlap"])
    args.virtual_pipeline_model_parallel_size, args.overlap_p2p_comm = None, False  # 1F1B
    args.overlap_p2p_comm_warmup_flush = False
    hooks.validate_mhc_args(args)
    assert hooks.mhc_config_from_args(args).overlap is True
    assert args.overlap_p2p_comm_warmup_flush is False  # no p2p overlap in Megatron's 1F1B
    args.virtual_pipeline_model_parallel_size, args.overlap_p2p_comm = 2, True  # interleaved
    hooks.validate_mhc_args(args)
    assert args.overlap_p2p_comm_warmup_flush is True
    assert hooks.mhc_config_from_args(_parse(["--enable-mhc"])).overlap is False
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = argparse.Namespace(hidden_size=16, batch_p2p_sync=True)
    hooks.apply_mhc_to_spec(get_gpt_layer_local_spec(), args, config)
    assert config.batch_p2p_sync is False  # 1F1B: no host sync after each p2p
    config = argparse.Namespace(hidden_size=16, batch_p2p_sync=True)
    hooks.apply_mhc_to_spec(get_gpt_layer_local_spec(), _parse(["--enable-mhc"]), config)
    assert config.batch_p2p_sync is True  # without --mhc-overlap: Megatron's behaviour
    refused = _parse(["--enable-mhc", "--mhc-overlap", "--mhc-log-interval", "-1"])
    refused.virtual_pipeline_model_parallel_size, refused.overlap_p2p_comm = 2, False
    refused.overlap_p2p_comm_warmup_flush = False
    with pytest.raises(ValueError, match="--mhc-overlap .*--no-overlap-p2p-communication"):
        hooks.validate_mhc_args(refused)
    assert refused.overlap_p2p_comm_warmup_flush is False  # nothing changed on error


@pytest.mark.parametrize("argv, message", [
    (["--mhc-expansion-rate", "4"], "--mhc-expansion-rate given without --enable-mhc"),
    (["--mhc-overlap"], "--mhc-overlap given without --enable-mhc"),
    (["--enable-mhc", "--mhc-expansion-rate", "1"], "--mhc-expansion-rate.*2..16"),
    (["--enable-mhc", "--mhc-gate-init", "-1"], "--mhc-gate-init"),
    (["--enable-mhc", "--cuda-graph-impl", "full_iteration"],
     "--cuda-graph-impl full_iteration .*not run with mHC.*allowed: none, local, "
     "transformer_engine"),
    (["--enable-mhc", "--mhc-variant", "residual", "--cuda-graph-impl", "transformer_engine"],
     "--cuda-graph-impl transformer_engine with --mhc-variant residual"),
    (["--enable-mhc", "--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "mlp"],
     "--cuda-graph-modules mlp with --cuda-graph-impl transformer_engine .*allowed: attn"),
    (["--enable-mhc", "--cuda-graph-impl", "transformer_engine", "--mhc-recompute-block", "2"],
     "--mhc-recompute-block with --cuda-graph-impl transformer_engine"),
    (["--enable-mhc", "--cuda-graph-impl", "local", "--mhc-recompute-block", "2"],
     "--mhc-recompute-block with --cuda-graph-impl local"),
    (["--enable-mhc", "--cuda-graph-impl", "local", "--mhc-overlap"],
     "--mhc-overlap with --cuda-graph-impl local"),
    (["--enable-mhc", "--mhc-log-interval", "-3"], "--mhc-log-interval"),
])
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        hooks.validate_mhc_args(_parse(argv))


@pytest.mark.parametrize("argv, message", [
    (["--mhc-recompute-block", "0"], "--mhc-recompute-block.*'auto' or a positive integer"),
    (["--mhc-variant", "xl"], "--mhc-variant.*invalid choice"),
    (["--mhc-kernel-backend", "cuda"], "--mhc-kernel-backend.*invalid choice"),
])
def test_argparse_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    import re

    assert re.search(message, capsys.readouterr().err)


def test_apply_mhc_to_spec_wraps_layers_and_blocks(monkeypatch):
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_mhc.core.layer import MHCLayerMixin
    from megatron_mhc.training.grad_buffer_layout import padded_param_layout

    monkeypatch.setattr(buffers, "_compute_default_per_buffer_param_layout",
                        buffers._compute_default_per_buffer_param_layout)
    args = _parse(["--enable-mhc", "--mhc-expansion-rate", "3"])
    config = argparse.Namespace(hidden_size=16)
    layer = get_gpt_layer_local_spec()
    wrapped = hooks.apply_mhc_to_spec(layer, args, config)
    # DDP's default gradient-buffer layout now pads parameter starts (grad_buffer_layout).
    assert buffers._compute_default_per_buffer_param_layout is padded_param_layout
    assert issubclass(wrapped.module, MHCLayerMixin) and wrapped.params["mhc_config"].n == 3
    assert hooks.pipeline_hidden_size(config) == 48
    block = TransformerBlockSubmodules(layer_specs=[layer, layer], layer_norm=None)
    wrapped_block = hooks.apply_mhc_to_spec(block, args, config)
    assert all(issubclass(s.module, MHCLayerMixin) for s in wrapped_block.layer_specs)
    # Without --enable-mhc nothing changes.
    assert hooks.apply_mhc_to_spec(layer, _parse([]), argparse.Namespace(hidden_size=16)) is layer
    with pytest.raises(TypeError, match="cannot wrap"):
        hooks.apply_mhc_to_spec(layer.submodules.self_attention, args, config)


def test_launcher_refuses_a_checkpoint_that_does_not_match_the_flags(tmp_path, monkeypatch):
    """``megatron-mhc launch`` installs the same validate hook: Megatron's own argument parsing
    and validation (also with --use-checkpoint-args, which takes no --mhc-* flag from the
    checkpoint) refuses a plain checkpoint under --enable-mhc, before any model is built."""
    import importlib
    import sys

    from fixtures.checkpoints import cpu_megatron, save_plain_checkpoint

    from megatron_mhc.training import launch

    with cpu_megatron():  # Megatron's own reading of the tracker then runs without a group
        save_plain_checkpoint(tmp_path / "plain")
    arguments = importlib.import_module("megatron.training.arguments")
    training = importlib.import_module("megatron.training.training")
    from megatron.training.checkpointing import load_args_from_checkpoint

    # install_hooks wraps module attributes for the rest of the process: restore them afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    for module, name in ((arguments, "add_megatron_arguments"), (arguments, "validate_args"),
                         (training, "train_step")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(arguments, "_mhc_launch_hooks", False, raising=False)
    for module_name, name in (("megatron.training.models.gpt", "GPTModel"),
                              ("megatron.training.models.hybrid", "HybridModel")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    from megatron.core.models.common.model_chunk_schedule_plan import (
        TransformerLayerSchedulePlan,
    )

    from megatron_mhc.core.schedule_nodes import schedule_plans_are_hooked

    monkeypatch.setattr(TransformerLayerSchedulePlan, "_build_callable_nodes",
                        TransformerLayerSchedulePlan._build_callable_nodes)
    assert not schedule_plans_are_hooked()
    launch.install_hooks(str(tmp_path))
    assert schedule_plans_are_hooked()  # the EP-overlap schedule's mhc_post node
    base = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
            "4", "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
            "--load", str(tmp_path / "plain")]

    def parse_and_validate(*flags):  # Megatron's parse_and_validate_args, less its global state
        monkeypatch.setattr(sys, "argv", [*base, *flags])
        args = arguments.parse_args()
        if args.use_checkpoint_args:
            load_args_from_checkpoint(args)
        arguments.validate_args(args, {})
        return args

    for flags in (["--enable-mhc"], ["--enable-mhc", "--use-checkpoint-args"]):
        with pytest.raises(ValueError, match=r"plain \(iter_0000007\) holds a model without mHC "
                                             r"parameters.*megatron-mhc convert plain-to-mhc"):
            parse_and_validate(*flags)
    assert parse_and_validate("--use-checkpoint-args").enable_mhc is False
