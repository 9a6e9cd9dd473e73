"""The generic entry/merge link (``megatron_mhc.core.link``): the PyTorch op set's entry and merge
joined so that only the stream crosses between autograd graphs, with the plain composition's
values and gradients."""

import pytest
import torch

from megatron_mhc.core.link import GenericLink
from megatron_mhc.core.ops import reference

N, C, T = 4, 8, 5


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    m = N * N + 2 * N

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    return dict(x=leaf(T, N, C), phi=leaf(N * C, m, scale=0.3), alpha=leaf(3, scale=0.5),
                bias=leaf(m), w=leaf(C, C, scale=0.3))


def _grads(inputs):
    return {name: t.grad.clone() for name, t in inputs.items()}


def _plain(inputs):
    agg, h_post, h_res = reference.enter(inputs["x"], inputs["phi"], inputs["alpha"],
                                         inputs["bias"], "mhc", 20, 1e-6)
    out = reference.post_res_merge(inputs["x"], torch.tanh(agg @ inputs["w"]), h_post, h_res)
    out.pow(2).sum().backward()
    return out.detach(), _grads(inputs)


def _linked(inputs, separate_graphs: bool):
    link = GenericLink()
    agg, h_post, h_res, x_link = link.enter(reference.enter, inputs["x"], inputs["phi"],
                                            inputs["alpha"], inputs["bias"], "mhc", 20, 1e-6)
    y = torch.tanh(agg @ inputs["w"])
    if not separate_graphs:
        out = link.merge(reference.post_res_merge, x_link, y, h_post, h_res)
        out.pow(2).sum().backward()
        return out.detach(), _grads(inputs)
    # As Megatron's schedule nodes do: the merge's graph starts from detached copies of the
    # stream and of the sublayer output; its backward runs first, then the entry side's.
    x_leaf = x_link.detach().requires_grad_()
    y_leaf = y.detach().requires_grad_()
    out = link.merge(reference.post_res_merge, x_leaf, y_leaf, h_post, h_res)
    out.pow(2).sum().backward()
    torch.autograd.backward((x_link, y), (x_leaf.grad, y_leaf.grad))
    return out.detach(), _grads(inputs)


@pytest.mark.parametrize("separate_graphs", [False, True])
def test_generic_link_equals_the_plain_composition(separate_graphs):
    out0, grads0 = _plain(_inputs(11))
    out1, grads1 = _linked(_inputs(11), separate_graphs)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for name, grad in grads0.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads1[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_entry_backward_before_its_merge_backward_is_refused():
    inputs = _inputs(12)
    link = GenericLink()
    agg, h_post, h_res, x_link = link.enter(reference.enter, inputs["x"], inputs["phi"],
                                            inputs["alpha"], inputs["bias"], "mhc", 20, 1e-6)
    x_leaf = x_link.detach().requires_grad_()
    link.merge(reference.post_res_merge, x_leaf, agg.detach(), h_post, h_res)
    with pytest.raises(RuntimeError, match="before its merge's backward"):
        torch.autograd.backward(x_link, torch.ones_like(x_link))


def test_generic_link_under_autograd_grad_with_named_inputs():
    """``torch.autograd.grad(out, inputs=...)``, as ``torch.cuda.make_graphed_callables`` (the
    local CUDA-graph path) computes the backward: the engine runs only the nodes that lead to the
    named inputs, so the merge's hand-over of dH_post / dH_res must sit on the stream's path (it
    ran on a side branch to the cut leaves once, was skipped, and the entry refused)."""
    inputs0, inputs1 = _inputs(13), _inputs(13)
    _plain(inputs0)
    link = GenericLink()
    agg, h_post, h_res, x_link = link.enter(reference.enter, inputs1["x"], inputs1["phi"],
                                            inputs1["alpha"], inputs1["bias"], "mhc", 20, 1e-6)
    out = link.merge(reference.post_res_merge, x_link, torch.tanh(agg @ inputs1["w"]), h_post,
                     h_res)
    names = sorted(inputs1)
    grads = torch.autograd.grad(out.pow(2).sum(), [inputs1[k] for k in names])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, inputs0[name].grad, rtol=1e-12, atol=1e-14, msg=name)
