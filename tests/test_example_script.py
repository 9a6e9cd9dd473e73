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
    ({"IMPL": "local", "GRAPHS": "cudnn"}, "GRAPHS=cudnn: allowed local"),
    ({"IMPL": "local", "GRAPHS": "full_iteration"}, "GRAPHS=full_iteration: allowed local"),
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
