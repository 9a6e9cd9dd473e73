"""A PyTorch stand-in for Apex's ``fused_weight_gradient_mlp_cuda`` extension, for GPU machines
without Apex (the lent benchmark machines here).

Megatron-LM refuses ``--gradient-accumulation-fusion`` unless this module imports: its own
``ColumnParallelLinear`` (the untied output layer, even on Transformer-Engine) calls it to add a
weight gradient to the float32 ``main_grad``. Putting this folder on ``PYTHONPATH`` lets the
example train with the flag on, so that the mHC parameter grads (and TE's weights) take the
fused-accumulation path. The math is Apex's (``main_grad += grad_output^T @ input``, float32
accumulation); the speed is not: one GEMM with a float32 output plus one add. Never shipped in
the package; ``benchmarks/te_stack_runs.sh gradfusion`` uses it only when Apex is absent.
"""

import torch


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
    x = total_input.reshape(-1, total_input.shape[-1])
    g = grad_output.reshape(-1, grad_output.shape[-1])
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        wgrad = torch.mm(g.t(), x, out_dtype=torch.float32)  # 16-bit GEMM, float32 output
    else:
        wgrad = torch.mm(g.t().float(), x.float())
    main_grad.add_(wgrad.to(main_grad.dtype))


def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
    """``main_grad += grad_output^T @ total_input`` into a float32 ``main_grad``."""
    _accumulate(total_input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
    """The same into a 16-bit ``main_grad``."""
    _accumulate(total_input, grad_output, main_grad)
