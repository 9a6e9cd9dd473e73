"""MHCConfig validation: every bad value names its flag and the allowed values."""

import re

import pytest
import torch

from megatron_mhc.core.config import FLAG_NAMES, MHCConfig


@pytest.mark.parametrize(
    "kwargs, flag, allowed",
    [
        (dict(variant="mhc2"), "--mhc-variant", "mhc, hc, residual"),
        (dict(expansion_rate=1), "--mhc-expansion-rate", "2..16"),
        (dict(expansion_rate=17), "--mhc-expansion-rate", "2..16"),
        (dict(expansion_rate=2.0), "--mhc-expansion-rate", "2..16"),
        (dict(sinkhorn_iters=0), "--mhc-sinkhorn-iters", "1..1000"),
        (dict(gate_init=-0.1), "--mhc-gate-init", ">= 0"),
        (dict(gate_init=float("nan")), "--mhc-gate-init", ">= 0"),
        (dict(init_method="zeros"), "--mhc-init-method", "default, function_preserving"),
        (dict(res_init_logit=31.0), "--mhc-res-init-logit", "[0, 30]"),
        (dict(norm_eps=0.0), "--mhc-norm-eps", "(0, 1)"),
        (dict(kernel_backend="cuda"), "--mhc-kernel-backend", "auto, torch, triton, tilelang"),
        (dict(recompute_block=-1), "--mhc-recompute-block", "positive integer"),
        (dict(recompute_block=2, recompute_rebuild="layer"), "--mhc-recompute-rebuild",
         "auto, block, sublayer"),
        (dict(recompute_rebuild="sublayer"), "--mhc-recompute-rebuild",
         "'auto' unless --mhc-recompute-block is set"),
        (dict(overlap="yes"), "--mhc-overlap", "True or False"),
    ],
)
def test_bad_values_name_flag_and_allowed(kwargs, flag, allowed):
    with pytest.raises(ValueError) as err:
        MHCConfig(**kwargs)
    assert flag in str(err.value)
    assert allowed in str(err.value)


def test_defaults_and_derived_values():
    cfg = MHCConfig()
    assert (cfg.n, cfg.variant, cfg.sinkhorn_iters, cfg.mapping_width) == (4, "mhc", 20, 24)
    assert MHCConfig(variant="residual").n == 1
    assert MHCConfig(variant="residual", expansion_rate=8).n == 1
    assert set(cfg.as_dict()) == set(FLAG_NAMES)


def test_backend_resolution_is_explicit(monkeypatch):
    from megatron_mhc.core import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends.triton_availability.cache_clear()
    backends.tilelang_availability.cache_clear()
    try:
        assert backends.resolve_backend("torch") == "torch"
        report = backends.backend_report()
        assert report["torch"].available
        if not report["tilelang"].available:
            with pytest.raises(RuntimeError, match="--mhc-kernel-backend tilelang is not available"):
                backends.resolve_backend("tilelang")
        # No CUDA and no interpreter: Triton is not available, so auto is the torch ops.
        if not torch.cuda.is_available():
            assert not report["triton"].available
            assert backends.resolve_backend("auto") == "torch"
        with pytest.raises(ValueError, match="allowed: auto, torch, triton, tilelang"):
            backends.resolve_backend("cuda")
    finally:
        backends.triton_availability.cache_clear()
        backends.tilelang_availability.cache_clear()


@pytest.mark.parametrize("triton_ok, tilelang_ok, expected", [
    (True, True, "triton"), (True, False, "triton"), (False, True, "tilelang"),
    (False, False, "torch")])
def test_auto_takes_the_first_available_backend(monkeypatch, triton_ok, tilelang_ok, expected):
    """``auto`` prefers Triton, then TileLang, then the torch ops (every combination)."""
    from megatron_mhc.core import backends

    def availability(ok):
        return lambda: backends.Availability(ok, "" if ok else "not here")

    monkeypatch.setattr(backends, "triton_availability", availability(triton_ok))
    monkeypatch.setattr(backends, "tilelang_availability", availability(tilelang_ok))
    assert backends.resolve_backend("auto") == expected


def test_auto_says_which_measurement_it_rests_on():
    """``megatron-mhc info`` says why ``auto`` resolves as it does: the committed measurement for
    the GPU generation (its raw-log folder exists), or that the generation was not measured."""
    from pathlib import Path

    from megatron_mhc.core.backends import AUTO_MEASURED, auto_choice_reason

    hopper = auto_choice_reason((9, 0))
    assert "measured on Hopper" in hopper and "CUDA entry forward" in hopper
    root = Path(__file__).resolve().parent.parent
    for text in AUTO_MEASURED.values():
        for folder in re.findall(r"benchmarks/results/[^;)\s]+", text):
            assert (root / folder).is_dir(), folder
    assert "sm_100 not measured" in auto_choice_reason((10, 0))
    assert auto_choice_reason(None if not torch.cuda.is_available() else (8, 0))
