"""The stability-run log parser and summary (megatron_mhc.tools.stability, tools/stability_report.py)."""

import json

import pytest

from megatron_mhc.tools.stability import count_spikes, load_run, summary_table


def _iteration_line(step, loss, grad, skipped=0):
    return (f" [2026-11-22 22:59:38.051045] iteration {step:8d}/     600 | consumed samples: "
            f"{16 * step:12d} | elapsed time per iteration (ms): 350.0 | learning rate: "
            f"2.000000E-04 | global batch size:    16 | lm loss: {loss:.6E} | loss scale: 1.0 | "
            f"grad norm: {grad:.3f} | params norm: 235.401 | number of skipped iterations: "
            f"{skipped:3d} | number of nan iterations:   0 |")


def _write_run(folder, variant, losses, grads, gains=None):
    lines = [_iteration_line(10 * (i + 1), loss, grad) for i, (loss, grad) in
             enumerate(zip(losses, grads))]
    lines.insert(3, " validation loss at iteration 30 | lm loss value: 5.500000E+00 | lm loss PPL: 1 | ")
    lines.append(" validation loss at iteration 600 on validation set | lm loss value: "
                 "4.250000E+00 | lm loss PPL: 70.1 | ")
    (folder / f"{variant}.log").write_text("\n".join(lines) + "\n")
    if gains:
        (folder / f"{variant}.gains.jsonl").write_text(
            "\n".join(json.dumps(g) for g in gains) + "\n")


def test_load_run_parses_losses_validation_and_gains(tmp_path):
    gains = [{"iteration": 25, "layer_forward": [1.5, 2.0], "layer_backward": [1.0, 1.0],
              "composite_forward_by_depth": [1.5, 3.0], "composite_backward_by_depth": [1, 1],
              "composite_forward": 3.0, "composite_backward": 1.0}]
    _write_run(tmp_path, "hc", [6.0, 5.0, 4.5], [2.0, 1.0, 0.5], gains)
    run = load_run(tmp_path / "hc.log", "hc", label="seed1")
    assert run.iterations == [10, 20, 30]
    assert run.train_loss == pytest.approx([6.0, 5.0, 4.5])
    assert run.grad_norm == pytest.approx([2.0, 1.0, 0.5])
    assert run.valid == {30: 5.5} and run.final_valid == 4.25
    assert run.gains == gains
    table = summary_table([run])
    assert "| seed1 | hc | 5.1667 | 4.2500 | 3.000 / 1.000 | 2.000 | 0 | 0 | 0 |" in table


def test_a_resumed_run_keeps_the_last_logged_values(tmp_path):
    lines = [_iteration_line(10, 6.0, 1.0), _iteration_line(20, 5.0, 1.0),
             _iteration_line(20, 4.9, 1.0), _iteration_line(30, 4.8, 1.0)]
    (tmp_path / "mhc.log").write_text("\n".join(lines))
    run = load_run(tmp_path / "mhc.log", "mhc")
    assert run.iterations == [10, 20, 30] and run.train_loss == pytest.approx([6.0, 4.9, 4.8])


def test_count_spikes_ignores_warmup_and_finds_jumps():
    steps = list(range(10, 310, 10))
    values = [5.0] * len(steps)
    values[2] = 9.0  # iteration 30: warm-up, not counted
    values[20] = 5.6  # iteration 210: 12 % above the median of the previous five
    values[25] = 5.4  # 8 %: below the 10 % threshold
    assert count_spikes(steps, values, 1.10) == 1
