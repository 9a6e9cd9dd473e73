"""mHC recompute in blocks of L_r layers: same loss and gradients, fewer stored streams."""

import gc
import weakref

import pytest
import torch

from megatron_mhc import MHCConfig
from megatron_mhc.core.recompute import REGISTRY, optimal_recompute_block
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss


def test_optimal_block_follows_the_paper_formula():
    assert optimal_recompute_block(4, 60) == round((4 * 60 / 6) ** 0.5) == 6
    assert optimal_recompute_block(4, 1) == 1
    assert optimal_recompute_block(8, 100) == 9


def _run(block, backend, tokenised_bytes, rebuild="auto", rebuilds=None):
    """Loss and gradients of a 4-layer mHC GPT; appends the bytes of the streams replaced by
    tokens in the forward to ``tokenised_bytes`` and the merges rebuilt in the backward to
    ``rebuilds`` (a list, if given)."""
    torch.manual_seed(3)
    settings = TinyGPTSettings(num_layers=4, hidden_size=32, seq_length=16)
    model = build_tiny_gpt(settings, MHCConfig(expansion_rate=4, kernel_backend=backend,
                                               recompute_block=block, recompute_rebuild=rebuild))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    sizes = []

    original_pack = REGISTRY.pack

    def pack(t):
        packed = original_pack(t)
        if isinstance(packed, tuple):  # a stream replaced by a token: not stored
            sizes.append(t.numel() * t.element_size())
        return packed

    rebuilt = []
    original_add = REGISTRY.add_merged

    def add_merged(out, parent, rebuild_fn):
        def counted(*args):
            rebuilt.append(1)
            return rebuild_fn(*args)

        return original_add(out, parent, counted)

    REGISTRY.pack, REGISTRY.add_merged = pack, add_merged
    try:
        loss = lm_loss(model, tokens)
    finally:
        REGISTRY.pack, REGISTRY.add_merged = original_pack, original_add
    loss.backward()
    tokenised_bytes.append(sum(sizes))
    if rebuilds is not None:
        rebuilds.append(len(rebuilt))
    gc.collect()
    assert len(REGISTRY.live) == 0  # nothing of the step is kept after its backward
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _expected_rebuilds(blocks, sublayers, rebuild):
    """Merges rebuilt in one backward: per block of ``sublayers``, ``block`` rebuilds each of its
    sublayers - 1 inner streams once, ``sublayer`` rebuilds each chain from the block input
    (s-1 + s-2 + ... + 1), ``auto`` does the last block as ``sublayer``, the others as ``block``."""
    once, chains = sublayers - 1, sublayers * (sublayers - 1) // 2
    if rebuild == "block":
        return blocks * once
    if rebuild == "sublayer":
        return blocks * chains
    return chains + (blocks - 1) * once


@pytest.mark.parametrize("backend, block, rebuild", [
    (backend, block, "auto") for backend in ("torch", "triton") for block in (1, 2, 0)
] + [("torch", 2, "block"), ("torch", 2, "sublayer")])  # triton: the test below
def test_recompute_keeps_loss_and_gradients(megatron_cpu, backend, block, rebuild):
    base_bytes, rc_bytes, base_rebuilds, rc_rebuilds = [], [], [], []
    loss0, grads0 = _run(None, backend, base_bytes, rebuilds=base_rebuilds)
    loss1, grads1 = _run(block, backend, rc_bytes, rebuild, rebuilds=rc_rebuilds)
    assert base_bytes == [0] and base_rebuilds == [0]
    # The backward really recomputes, on either backend: every stream inside a block but its
    # first is rebuilt (4 layers, 2 sublayers each; L_r = 0 is the optimum, 2 here), and a
    # block-sized share of them was not stored in the forward.
    layers = block or optimal_recompute_block(4, 4)
    assert rc_rebuilds == [_expected_rebuilds(4 // layers, 2 * layers, rebuild)], rc_rebuilds
    assert rc_bytes[0] > 0
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        # The rebuilt streams come from the same kernels on the same inputs: measured
        # bit-identical on CPU for both backends and every policy.
        torch.testing.assert_close(grads1[name], grad, rtol=0, atol=0, msg=name)


def test_rebuild_policies_bound_the_streams_alive(megatron_cpu, monkeypatch):
    """4 layers, L_r = 2: two blocks of 4 sublayers, 3 rebuilt streams each. ``block`` rebuilds
    each once and holds all 3 at the start of a block's backward; ``sublayer`` holds one and
    rebuilds 3 + 2 + 1 times, in one buffer per chain; ``auto`` does the last block (whose
    backward comes first, at the peak) as ``sublayer`` and the first as ``block``. All three
    give the same loss and gradients bit for bit."""
    streams, counts = [], {}
    original_add, original_unpack = REGISTRY.add_merged, REGISTRY.unpack

    def add_merged(out, parent, rebuild_fn):
        def counted(value, buffer):
            counts["merges"] += 1
            counts["in_place"] += buffer is not None
            return rebuild_fn(value, buffer)

        added = original_add(out, parent, counted)
        if added:
            streams.append(weakref.ref(out._mhc_stream))
        return added

    def unpack(packed):
        value = original_unpack(packed)
        if isinstance(packed, tuple):
            root = packed[1].root  # weakly held: the test must not keep the block alive
            if counts.setdefault("last_root", weakref.ref(root))() is not root:
                counts["blocks_done"] = 1
            alive = sum(1 for ref in streams if ref() is not None and ref().cache is not None)
            # per block: the first block rebuilt is the model's last
            key = "most_alive_first_rebuilt" if counts["blocks_done"] == 0 else "most_alive_later"
            counts[key] = max(counts[key], alive)
        return value

    monkeypatch.setattr(REGISTRY, "add_merged", add_merged)
    monkeypatch.setattr(REGISTRY, "unpack", unpack)
    results = {}
    for rebuild in ("block", "sublayer", "auto"):
        counts.clear()
        counts.update(merges=0, in_place=0, most_alive_first_rebuilt=0, most_alive_later=0,
                      blocks_done=0)
        loss_grads = _run(2, "triton", [], rebuild)
        del counts["last_root"], counts["blocks_done"]
        results[rebuild] = loss_grads, dict(counts)
    # sublayer chains: 3, 2, 1 merges; the 2nd and 3rd of a chain write into the one before
    expected = {
        "block": {"merges": 2 * 3, "in_place": 0, "most_alive_first_rebuilt": 3,
                  "most_alive_later": 3},
        "sublayer": {"merges": 2 * (3 + 2 + 1), "in_place": 2 * (2 + 1),
                     "most_alive_first_rebuilt": 1, "most_alive_later": 1},
        "auto": {"merges": 3 + 2 + 1 + 3, "in_place": 2 + 1, "most_alive_first_rebuilt": 1,
                 "most_alive_later": 3},
    }
    (loss_ref, grads_ref), _ = results["block"]
    for rebuild, ((loss, grads), counted) in results.items():
        assert counted == expected[rebuild], rebuild
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=f"{rebuild} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("block", [None, 2], ids=["stored", "recompute-L_r=2"])
def test_dx_once_backward_through_the_model(megatron_cpu, monkeypatch, merge_x_reads, block):
    """The opt-in "dx once" backward (``MHC_BACKWARD_DX_ONCE=1``) in a 4-layer GPT on the triton
    ops, with the streams stored and with recompute in blocks of 2 layers: every merge backward
    runs without x, and loss and gradients equal the default backward's to float32 rounding."""
    from megatron_mhc.kernels.triton import _launch

    loss0, grads0 = _run(block, "triton", [])
    assert merge_x_reads and all(merge_x_reads)  # the default backward reads x in every merge
    merge_x_reads.clear()
    monkeypatch.setattr(_launch, "BACKWARD_DX_ONCE", "1")
    loss1, grads1 = _run(block, "triton", [])
    assert len(merge_x_reads) == 8 and not any(merge_x_reads)  # 4 layers, 2 sublayers each
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-6, msg=name)
