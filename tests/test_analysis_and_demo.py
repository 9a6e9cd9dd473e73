"""Gain analysis on hand-built mappings, and a short demo run."""

import torch

from megatron_mhc.core.gains import backward_gain, forward_gain, gain_report


def test_gains_of_hand_built_mappings():
    h1 = torch.tensor([[2.0, -1.0], [0.5, 0.5]])  # row sums |.|: 3, 1; column sums: 2.5, 1.5
    h2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # row sums: 1, 2; column sums: 2, 1
    assert forward_gain(h1).item() == 3.0 and backward_gain(h1).item() == 2.5
    report = gain_report([h1.expand(5, 2, 2), h2.expand(5, 2, 2)])
    assert report.layer_forward == [3.0, 2.0]
    assert report.layer_backward == [2.5, 2.0]
    composite = h2 @ h1  # [[2, -1], [2.5, -0.5]]: row sums 3, 3; column sums 4.5, 1.5
    assert report.composite_forward == [3.0, forward_gain(composite).item()] == [3.0, 3.0]
    assert report.composite_backward == [2.5, 4.5]
    assert report.max_composite_backward == 4.5


def test_gain_report_takes_the_max_over_tokens():
    eye = torch.eye(3).expand(4, 3, 3).clone()
    eye[2] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    report = gain_report([eye])
    assert report.layer_forward == [5.0] and report.layer_backward == [5.0]


def test_demo_runs_and_prints_the_table(capsys):
    from megatron_mhc.tools.demo import main
    from megatron_mhc.training.cpu import destroy_cpu_distributed

    try:
        results = main(["--steps", "3", "--num-layers", "2", "--hidden-size", "32",
                        "--seq-length", "32", "--micro-batch-size", "2", "--device", "cpu",
                        "--variants", "residual,mhc,hc"])
    finally:
        destroy_cpu_distributed()
    out = capsys.readouterr().out
    assert "| variant | streams | train loss | val loss |" in out
    assert [r.variant for r in results] == ["residual", "mhc", "hc"]
    assert all(torch.isfinite(torch.tensor([r.train_loss, r.val_loss])).all() for r in results)
    mhc = results[1]
    assert 0.9 < mhc.max_backward_gain < 1.1


def test_demo_rejects_bad_flags(capsys):
    import pytest

    from megatron_mhc.tools.demo import main

    with pytest.raises(SystemExit):
        main(["--variants", "mhc,foo"])
    assert "allowed values are mhc, hc, residual" in capsys.readouterr().err


def test_cli_info_and_bad_command(capsys):
    from megatron_mhc.tools.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel backend torch" in out and "auto resolves to" in out
    assert main(["frobnicate"]) == 2
    assert "allowed: info, demo" in capsys.readouterr().err
