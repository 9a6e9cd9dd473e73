"""The checkpoint tools: plain -> mHC conversion (function-preserving), ours <-> upstream layout,
and the H_res gain report (against a hand-built example)."""

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from fixtures.checkpoints import SETTINGS, save_mhc_checkpoint
from fixtures.checkpoints import save_plain_checkpoint as _save_plain_megatron_checkpoint
from fixtures.checkpoints import tokens as _tokens

from megatron_mhc import MHCConfig
from megatron_mhc.core.gains import gain_report
from megatron_mhc.tools.convert import ConversionError, convert
from megatron_mhc.training.checkpoint_io import CheckpointError, read_model_checkpoint


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _load_mhc_loss(checkpoint_root: Path, mhc_config: MHCConfig):
    from megatron.core import dist_checkpointing

    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    torch.manual_seed(99)  # a different init: everything must come from the checkpoint
    model = build_tiny_gpt(TinyGPTSettings(**SETTINGS), mhc_config)
    iter_dir = checkpoint_root / "iter_0000007"
    state = dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    with torch.no_grad():
        return lm_loss(model, _tokens()), model


@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_plain_to_mhc_is_function_preserving(megatron_cpu, tmp_path, variant):
    src, out = tmp_path / "plain", tmp_path / "mhc"
    plain_loss = _save_plain_megatron_checkpoint(src)
    before = _tree_digest(src)
    mhc = MHCConfig(expansion_rate=4, variant=variant, kernel_backend="torch")
    convert("plain-to-mhc", src, out, mhc_config=mhc)
    assert _tree_digest(src) == before  # the input is never modified
    loss, model = _load_mhc_loss(out, mhc)
    # Bit for bit: measured |loss - plain_loss| = 0 for both variants on CPU (float32; the
    # gates are 0 so the streams carry the plain model's residual exactly).
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    # phi is random (breaks the stream symmetry), the gates are 0.
    hc = model.decoder.layers[0].attn_hc
    assert hc.phi.abs().max() > 0 and torch.all(hc.alpha == 0)
    converted = read_model_checkpoint(out)
    assert not any(k.startswith(("optimizer", "rng_state")) for k in converted.tensors)
    assert converted.iteration == "7" and converted.args.enable_mhc
    assert converted.args.mhc_variant == variant


def test_convert_refusals(megatron_cpu, tmp_path):
    src, out = tmp_path / "plain", tmp_path / "mhc"
    _save_plain_megatron_checkpoint(src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--overwrite"):
        convert("plain-to-mhc", src, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="overlaps the input"):
        convert("plain-to-mhc", src, src / "inside")
    with pytest.raises(CheckpointError, match="nothing-here does not exist"):
        convert("plain-to-mhc", tmp_path / "nothing-here", tmp_path / "o2")
    convert("plain-to-mhc", src, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    with pytest.raises(ConversionError, match="already has mHC parameters"):
        convert("plain-to-mhc", out, tmp_path / "twice")
    with pytest.raises(ConversionError, match="not an upstream mHC checkpoint"):
        convert("from-upstream", out, tmp_path / "up")


def test_upstream_layout_round_trip(megatron_cpu, tmp_path):
    from megatron_mhc.training.cpu import megatron_cpu_patched, unpatch_megatron_for_cpu

    src = tmp_path / "plain"
    _save_plain_megatron_checkpoint(src)
    # The converter runs as in a fresh process: a process group but none of the CPU training
    # replacements (its dist-ckpt calls need only cuda_calls_on_cpu; with the replacements in
    # place that guard would never be exercised).
    unpatch_megatron_for_cpu()
    assert not megatron_cpu_patched()
    # gate_init 0 must survive both renames (a falsy value, not a missing one).
    mhc = MHCConfig(expansion_rate=2, gate_init=0.0, sinkhorn_iters=7, kernel_backend="torch")
    convert("plain-to-mhc", src, tmp_path / "ours", mhc_config=mhc)
    convert("to-upstream", tmp_path / "ours", tmp_path / "upstream")
    convert("from-upstream", tmp_path / "upstream", tmp_path / "back")
    ours = read_model_checkpoint(tmp_path / "ours")
    upstream = read_model_checkpoint(tmp_path / "upstream")
    back = read_model_checkpoint(tmp_path / "back")
    n, hidden, width = 2, 32, 8
    prefix = "decoder.layers.self_attention_hyper_connection."
    # Upstream layout: nn.Linear weight [out, in] = phi^T, one [1] tensor per gate (stacked over
    # the 2 layers by Megatron's dist-ckpt).
    assert upstream.tensors[prefix + "mapping_proj.weight"].shape == (2, width, n * hidden)
    assert upstream.tensors[prefix + "alpha_res"].shape == (2, 1)
    assert upstream.args.enable_mhc_connections and upstream.args.mhc_num_residual_streams == n
    assert not hasattr(upstream.args, "enable_mhc")
    assert set(back.tensors) == set(ours.tensors)
    for key, tensor in ours.tensors.items():
        torch.testing.assert_close(back.tensors[key], tensor, rtol=0, atol=0)
    assert back.args.enable_mhc and back.args.mhc_expansion_rate == n
    assert upstream.args.mhc_init_gating_factor == 0.0 and back.args.mhc_gate_init == 0.0
    assert upstream.args.mhc_sinkhorn_iterations == 7 and back.args.mhc_sinkhorn_iters == 7


def test_to_upstream_refuses_hc(megatron_cpu, tmp_path):
    _save_plain_megatron_checkpoint(tmp_path / "plain")
    convert("plain-to-mhc", tmp_path / "plain", tmp_path / "hc",
            mhc_config=MHCConfig(variant="hc", kernel_backend="torch"))
    with pytest.raises(ConversionError, match="no upstream equivalent"):
        convert("to-upstream", tmp_path / "hc", tmp_path / "up")


def test_gain_report_hand_built_example():
    # H_a = [[1, 2], [0, 1]]: rows sum to 3, 1; columns to 1, 3.
    # H_b = [[1, 0], [-3, 1]]: |rows| 1, 4; |columns| 4, 1.
    # H_b H_a = [[1, 2], [-3, -5]]: |rows| 3, 8; |columns| 4, 7.
    h_a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    h_b = torch.tensor([[1.0, 0.0], [-3.0, 1.0]])
    report = gain_report([h_a, h_b])
    assert report.layer_forward == [3.0, 4.0]
    assert report.layer_backward == [3.0, 4.0]
    assert report.composite_forward == [3.0, 8.0]
    assert report.composite_backward == [3.0, 7.0]
    # Per token: the max over tokens of each token's own product.
    tokens = torch.stack([torch.eye(2), h_a]).unsqueeze(0)  # [1, 2 tokens, 2, 2]
    assert gain_report([tokens, tokens]).composite_forward == [3.0, 5.0]


def test_gain_report_cli_on_converted_checkpoint(megatron_cpu, tmp_path, capsys):
    from megatron_mhc.tools.cli import main

    _save_plain_megatron_checkpoint(tmp_path / "plain")
    assert main(["convert", "plain-to-mhc", str(tmp_path / "plain"), str(tmp_path / "mhc")]) == 0
    assert main(["gain-report", str(tmp_path / "mhc"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "max composite gain" in printed
    gains = json.loads((tmp_path / "report" / "gains.json").read_text())
    # 2 layers x 2 sublayers of static Sinkhorn(exp(4 I)): doubly stochastic, gain 1.
    assert len(gains["layer_forward"]) == 4
    assert max(gains["composite_forward"]) == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "report" / "gain_composite.png").stat().st_size > 0
    # The CLI's refusal: an existing output without --overwrite.
    assert main(["convert", "plain-to-mhc", str(tmp_path / "plain"), str(tmp_path / "mhc")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_training_gain_metrics_record_first_micro_batch(megatron_cpu):
    from megatron_mhc.training import metrics
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    model = build_tiny_gpt(TinyGPTSettings(**SETTINGS), MHCConfig(kernel_backend="torch"))
    metrics.arm([model])
    with torch.no_grad():
        lm_loss(model, _tokens())
        lm_loss(model, _tokens())  # a second micro-batch is not recorded
    assert all(len(m.recorded_h_res) == 1 for m in metrics._ARMED)
    gains = metrics.collect_gains(num_sublayers=4)
    metrics.disarm()
    assert all(m.recorded_h_res is None for m in metrics.hyper_connections(model))
    assert len(gains["layer_forward"]) == 4 and min(gains["layer_backward"]) > 0
    # Sinkhorn-projected: column sums are exactly 1, so backward gains are 1 (fp32 round-off).
    assert max(gains["layer_backward"]) == pytest.approx(1.0, abs=1e-5)
    assert gains["composite_backward"] == pytest.approx(1.0, abs=1e-5)
    assert gains["composite_forward"] >= 1.0 - 1e-5


def test_gain_report_batch_mode_rebuilds_the_model(megatron_cpu, tmp_path):
    """``gain-report --batch``: the model rebuilt from the checkpoint's args gives the same
    per-token gains as the in-memory model that wrote the checkpoint."""

    from megatron_mhc.core.gains import record_residual_mappings
    from megatron_mhc.tools.gain_report import batch_residual_mappings
    from megatron_mhc.training.small_gpt import causal_lm_inputs

    mhc = MHCConfig(expansion_rate=4, kernel_backend="torch")
    model = save_mhc_checkpoint(tmp_path / "ckpt", mhc)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    input_ids, position_ids, _, mask = causal_lm_inputs(
        torch.cat([tokens, tokens[:, :1]], dim=1))
    with torch.no_grad(), record_residual_mappings(model) as expected:
        model(input_ids, position_ids, mask)
    got = batch_residual_mappings(tmp_path / "ckpt", tokens)
    assert len(got) == len(expected) == 4
    want, have = gain_report(expected), gain_report(got)
    assert have.max_composite_forward > 1.0 + 1e-6  # input-dependent, not the static identity
    for field in ("layer_forward", "layer_backward", "composite_forward", "composite_backward"):
        assert getattr(have, field) == pytest.approx(getattr(want, field), rel=1e-5)


def test_after_train_step_logs_every_mhc_log_interval(megatron_cpu, monkeypatch, capsys, tmp_path):
    """The training-loop hook arms the step before each --mhc-log-interval multiple, logs that
    step's gains after it (also as a JSON line with --mhc-gain-log), and does nothing with the
    interval 0."""
    import json
    import sys
    import types

    from megatron_mhc.training import metrics
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    gain_log = tmp_path / "gains.jsonl"
    args = argparse.Namespace(enable_mhc=True, mhc_variant=None, mhc_log_interval=2,
                              log_interval=10, num_layers=2, mhc_gain_log=str(gain_log))
    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars.get_args = lambda: args
    global_vars.get_tensorboard_writer = lambda: None
    global_vars.get_wandb_writer = lambda: None
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    model = build_tiny_gpt(TinyGPTSettings(**SETTINGS), MHCConfig(kernel_backend="torch"))

    def step(iteration):
        with torch.no_grad():
            lm_loss(model, _tokens())
        metrics.after_train_step([model], iteration)

    metrics.after_train_step([model], 1)  # iteration 2 is a logging step: armed now
    assert metrics._ARMED
    step(2)
    assert "[mhc] iteration        2 | H_res gain" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in gain_log.read_text().splitlines()]
    assert record["iteration"] == 2 and len(record["layer_forward"]) == 4
    assert len(record["composite_forward_by_depth"]) == 4
    assert max(record["composite_forward_by_depth"]) == pytest.approx(record["composite_forward"])
    assert all(g > 0 for g in record["layer_forward"] + record["composite_backward_by_depth"])
    assert not metrics._ARMED  # 3 is not a multiple of 2
    step(3)
    assert metrics._ARMED and capsys.readouterr().out == ""
    metrics.disarm()
    args.mhc_log_interval = 0
    metrics.after_train_step([model], 3)
    assert not metrics._ARMED


def _pretrain_log(path, losses):
    """A minimal Megatron training log with the lm loss of each (iteration, loss) pair."""
    lines = [f" [2026-11-24] iteration {i:>8}/     200 | consumed samples: {8 * i} | elapsed time per "
             f"iteration (ms): 250.0 | lm loss: {loss:.6E} |" for i, loss in losses]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_curves_are_compared_with_the_reference_run(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_pretrain_logs.py"
    ref = _pretrain_log(tmp_path / "a.log", [(10, 9.5), (20, 7.0), (30, 5.0)])
    other = _pretrain_log(tmp_path / "b.log", [(10, 9.5), (20, 7.5), (30, 5.0)])
    done = subprocess.run([sys.executable, str(script), f"a={ref}", f"b={other}", "--reference", "a"],
                          capture_output=True, text=True, check=True)
    row = [line for line in done.stdout.splitlines() if line.startswith("| b | 3 ")]
    assert row and "| 0.5 |" in row[0] and "7.143%" in row[0], done.stdout
    bad = subprocess.run([sys.executable, str(script), f"a={ref}", "--reference", "c"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--reference c: no such run" in bad.stderr


def test_profile_summary_sorts_gpu_time_by_kind(tmp_path):
    """benchmarks/summarize_profile.py on two hand-made Chrome traces: mHC kernels recognised by
    their names in kernels/triton/*.py, per-step times, and the largest differences."""
    import gzip
    import subprocess
    import sys

    def trace(path, kernels):
        events = [{"ph": "X", "cat": cat, "name": name, "dur": dur, "ts": 0}
                  for cat, name, dur in kernels]
        events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 999, "ts": 0})
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": events}, f)
        return path

    plain = trace(tmp_path / "plain.json.gz", [("kernel", "nvjet_tst_128x256_h_bz", 4000.0),
                                               ("kernel", "flash_fwd_kernel", 1000.0)])
    mhc = trace(tmp_path / "mhc.json.gz", [("kernel", "nvjet_tst_128x256_h_bz", 4000.0),
                                           ("kernel", "flash_fwd_kernel", 1000.0),
                                           ("kernel", "post_res_fwd_kernel", 600.0),
                                           ("kernel", "post_res_fwd_kernel", 600.0),
                                           ("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 200.0)])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_profile.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "2", f"plain={plain}",
                           f"mhc={mhc}"], capture_output=True, text=True, check=True)
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ")}
    assert "| 0.00 | 0.60 | +0.60 |" in rows["mHC Triton kernels"], done.stdout
    assert "| 2.00 | 2.00 | +0.00 |" in rows["GEMM"], done.stdout
    assert "| 0.50 | 0.50 |" in rows["attention"] and "+0.10" in rows["memcpy/memset"]
    assert "| 2.50 | 3.20 | +0.70 |" in rows["total"], done.stdout
    assert "| 0 → 1 |" in rows["`post_res_fwd_kernel`"], done.stdout
    assert "| 2.00 | 2.00 | +0.00 |" in rows["GPU busy (kernels overlapped once)"], done.stdout
    missing = subprocess.run([sys.executable, str(script), f"x={tmp_path / 'none.json'}"],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "x: no trace file" in missing.stderr


def test_training_numerics_check_runs_on_cpu():
    """benchmarks/check_training_numerics.py (a GPU diagnostic) on its tiny CPU model: the gradient
    table against float32 and a loss curve; an unknown variant is refused by name."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_training_numerics.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--grad-variants", "torch", "--variants", "torch",
         "--trained-steps", "2", "--steps", "2", "--seeds", "1"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| torch |")]
    assert len(rows) == 3, done.stdout  # two gradient tables and one curve row
    relative_error = float(rows[0].split("|")[2].split()[0])
    assert 0 < relative_error < 0.05, rows[0]  # bf16 against float32, not a broken comparison
    bad = subprocess.run([sys.executable, str(script), "--tiny", "--variants", "cuda"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown variant 'cuda'" in bad.stderr
    if not torch.cuda.is_available():  # triton variants without a GPU or the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        no_triton = subprocess.run(
            [sys.executable, str(script), "--tiny", "--grad-variants", "triton", "--skip-curves",
             "--trained-steps", "0"], capture_output=True, text=True, env=env, timeout=600)
        assert no_triton.returncode == 1, no_triton.stderr[-2000:]
        assert "triton variants cannot run here" in no_triton.stderr
        assert "TRITON_INTERPRET=1" in no_triton.stderr


def test_dx_pass_probe_agrees_with_float64():
    """benchmarks/probes/probe_dx_once.py --check: the dx-pass layouts it times on a GPU (one
    stream per program adding dx_merge or applying H_res to g; all streams per program, with and
    without the previous merge's dy) against float64, under Triton's interpreter on CPU."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "probe_dx_once.py"
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "relative error" in line]
    assert len(lines) == 4 and "FOLD_DY=True" in lines[-1], done.stdout


@pytest.mark.slow
def test_saved_activation_report_counts_the_streams():
    """benchmarks/saved_activations.py on CPU (tiny local block, Triton interpreted): mHC n=4 keeps
    one bf16 n·C stream per sublayer, 2 * n * 2 = 16 bytes per token per layer per channel."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "saved_activations.py"
    done = subprocess.run(
        [sys.executable, str(script), "--hidden", "64", "--heads", "4", "--seq", "16",
         "--micro-batch", "2", "--layers", "2", "--recompute-blocks"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| plain") or line.startswith("| mHC")}
    assert "stream n·C" not in rows["plain"], rows
    assert "stream n·C bfloat16 16.00" in rows["mHC n=4 triton"], rows
