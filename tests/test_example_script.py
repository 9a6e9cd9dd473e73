"""``examples/pretrain_gpt_mhc.sh`` refuses bad environment combinations before starting anything,
naming the variable and what is allowed (run as users run it: bash, separate process)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "pretrain_gpt_mhc.sh"

CASES = [
    ({"IMPL": "tensorrt"}, "IMPL=tensorrt: allowed te, local, auto"),
    ({"IMPL": "local", "TP": "2", "SP": "1"}, "SP=1 needs TP > 1 and IMPL=te"),
    ({"IMPL": "te", "TP": "1", "SP": "1"}, "SP=1 needs TP > 1 and IMPL=te"),
    ({"IMPL": "local", "FP8": "1"}, "FP8=1 needs Transformer-Engine"),
    ({"IMPL": "local", "CP": "2"}, "CP=2 needs Transformer-Engine attention"),
    ({"IMPL": "local", "GRAPHS": "cudnn"}, "GRAPHS=cudnn: allowed local, transformer_engine"),
    ({"IMPL": "local", "GRAPHS": "full_iteration"},
     "GRAPHS=full_iteration: allowed local, transformer_engine"),
    ({"IMPL": "local", "GRAPHS": "transformer_engine"},
     "GRAPHS=transformer_engine needs Transformer-Engine (IMPL=te)"),
    ({"IMPL": "local", "GRAPH_MODULES": "attn"}, "GRAPH_MODULES=attn needs GRAPHS=transformer_engine"),
    ({"IMPL": "local", "GRAPHS": "local", "GRAPH_MODULES": "attn"},
     "GRAPH_MODULES=attn needs GRAPHS=transformer_engine"),
    ({"IMPL": "local", "GRAD_FUSION": "yes"}, "GRAD_FUSION=yes: allowed 0, 1"),
]
if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:  # Apex absent
    CASES.append(({"IMPL": "local", "GRAD_FUSION": "1"},
                  "GRAD_FUSION=1 needs Apex's fused_weight_gradient_mlp_cuda"))


@pytest.mark.parametrize("env, message", CASES, ids=[m.split(":")[0] for _, m in CASES])
def test_bad_combinations_are_refused_by_name(tmp_path, env, message):
    full_env = {**os.environ, "MEGATRON_LM": str(tmp_path), "PYTHON": "python3", **env}
    result = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


MOE_SCRIPT = SCRIPT.parent / "pretrain_moe_mhc.sh"

MOE_CASES = [
    ({"EXPERTS": "0"}, "EXPERTS=0: allowed a positive integer"),
    ({"TOPK": "9"}, "TOPK=9: allowed 1 .. EXPERTS (8)"),
    ({"EP": "3"}, "EP=3 must divide EXPERTS=8"),
    ({"EP": "2"}, "EP=2 needs GPUS set"),
    ({"EP": "4", "GPUS": "4", "PP": "2"}, "EP=4 must divide GPUS / PP = 4 / 2"),
    ({"EP_OVERLAP": "1"}, "EP_OVERLAP=1 (--overlap-moe-expert-parallel-comm) needs EP > 1"),
    ({"EP_OVERLAP": "1", "EP": "2", "GPUS": "2", "MTP": "2"}, "EP_OVERLAP=1 allows at most one MTP"),
    ({"EP_OVERLAP": "1", "EP": "2", "GPUS": "4", "PP": "2"},
     "EP_OVERLAP=1 with PP=2 needs the interleaved pipeline (set VPP_LAYERS)"),
    ({"VPP_LAYERS": "3"}, "VPP_LAYERS=3 needs PP > 1"),
    ({"EP_OVERLAP": "yes"}, "EP_OVERLAP=yes: allowed 0, 1"),
    ({"DELAY_WGRAD": "1"}, "DELAY_WGRAD=1 (--delay-wgrad-compute) needs EP_OVERLAP=1"),
    ({"DELAY_WGRAD": "1", "EP_OVERLAP": "1", "EP": "2", "GPUS": "2"},
     "DELAY_WGRAD=1 (--delay-wgrad-compute) needs IMPL=te"),
    ({"DELAY_WGRAD": "1", "EP_OVERLAP": "1", "EP": "2", "GPUS": "2", "IMPL": "te",
      "GRAPHS": "transformer_engine"}, "DELAY_WGRAD=1 with GRAPHS=transformer_engine is refused"),
    ({"DELAY_WGRAD": "on"}, "DELAY_WGRAD=on: allowed 0, 1"),
]


@pytest.mark.parametrize("env, message", MOE_CASES, ids=[m.split(":")[0] for _, m in MOE_CASES])
def test_moe_example_refuses_bad_combinations_by_name(tmp_path, env, message):
    full_env = {**os.environ, "MEGATRON_LM": str(tmp_path), "PYTHON": "python3", "IMPL": "local",
                **env}
    result = subprocess.run(["bash", str(MOE_SCRIPT)], env=full_env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("delay_wgrad", ["0", "1"])
def test_moe_example_launches_the_eight_gpu_layout(tmp_path, delay_wgrad):
    """The documented 8-GPU command (TP 2, PP 2 with VPP 2, DP 2, EP 4, SP, EP overlap, MTP)
    launches pretrain_gpt.py with exactly those flags (a stand-in Python prints its arguments);
    DELAY_WGRAD=1 adds --delay-wgrad-compute."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\n"
                    "[[ $1 == -c ]] && exit 1\n"  # 'import transformer_engine': absent
                    "printf '%s\\n' \"$@\" > \"$ARGS_OUT\"\n")
    fake.chmod(0o755)
    out = tmp_path / "args.txt"
    env = {**os.environ, "MEGATRON_LM": str(tmp_path / "mlm"), "PYTHON": str(fake),
           "SKIP_PATCH_CHECK": "1", "ARGS_OUT": str(out), "IMPL": "te", "TP": "2", "PP": "2",
           "SP": "1", "GPUS": "8", "EP": "4", "EP_OVERLAP": "1", "VPP_LAYERS": "3",
           "DELAY_WGRAD": delay_wgrad}
    result = subprocess.run(["bash", str(MOE_SCRIPT), "--train-iters", "50"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    args = out.read_text().split("\n")
    command = " ".join(args)
    for flags in ("--nproc-per-node 8", "--tensor-model-parallel-size 2",
                  "--pipeline-model-parallel-size 2", "--num-layers-per-virtual-pipeline-stage 3",
                  "--sequence-parallel", "--num-experts 8", "--moe-router-topk 2",
                  "--moe-token-dispatcher-type alltoall", "--expert-model-parallel-size 4",
                  "--expert-tensor-parallel-size 1", "--overlap-moe-expert-parallel-comm",
                  "--mtp-num-layers 1", "--enable-mhc", "--mhc-recompute-block auto",
                  "--transformer-impl transformer_engine", "--train-iters 50"):
        assert flags in command, flags
    assert ("--delay-wgrad-compute" in args) == (delay_wgrad == "1")
