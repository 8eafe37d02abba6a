"""Assertions and reference loops shared by the client tests."""
import torch

ATOL = 1e-4


def reset_bridge(bridge):
    """Removes every hook from a TransformerBridge and turns its opt-in hook points off again."""
    bridge.reset_hooks(including_permanent=True)
    bridge.set_use_attn_result(False)
    bridge.set_use_attn_in(False)
    bridge.set_use_split_qkv_input(False)
    bridge.set_use_hook_mlp_in(False)


def assert_close(actual, expected, atol=ATOL, what=""):
    actual = torch.as_tensor(actual).float()
    expected = torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite entries differ"
    diff = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert diff <= atol, f"{what}: max |diff| {diff} > {atol}"


def reference_greedy(reference, tokens, max_new_tokens, ops=None, hook_tensors=None,
                     attention_mask=None, eos_ids=(), stop_at_eos=False):
    """Greedy decoding with the reference (full sequence every step)."""
    seq = tokens.clone()
    mask = None if attention_mask is None else attention_mask.clone()
    finished = torch.zeros(seq.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits, _ = reference.forward(seq, attention_mask=mask, ops=ops, hook_tensors=hook_tensors)
        new = logits[:, -1].argmax(-1)
        if stop_at_eos:
            new = torch.where(finished, torch.full_like(new, eos_ids[0]), new)
            finished |= torch.isin(new, torch.tensor(list(eos_ids)))
        seq = torch.cat([seq, new[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(new[:, None])], dim=1)
        if stop_at_eos and finished.all():
            break
    return seq
