"""ActivationCache analysis helpers: decompositions must sum back to what the model computed."""
import pytest
import torch

from client_helpers import assert_close

PROMPTS = ["The cat sat on the mat.", "A dog ran in the park"]


@pytest.fixture
def run(model):
    tokens = model.to_tokens(PROMPTS)
    logits, cache = model.run_with_cache(tokens)
    return tokens, logits, cache


def test_accumulated_resid(model, reference, run):
    tokens, logits, cache = run
    _, ref_cache = reference.forward(tokens)
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    assert stack.shape == (n + 1, *tokens.shape, model.cfg.d_model)
    for i in range(n):
        assert_close(stack[i], ref_cache[f"blocks.{i}.hook_resid_pre"])
    assert_close(stack[-1], ref_cache[f"blocks.{n - 1}.hook_resid_post"])
    mid, mid_labels = cache.accumulated_resid(layer=2, incl_mid=True, mlp_input=True, return_labels=True)
    assert mid_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid"]
    # Logit lens: the final accumulated residual, normalised with ln_final's scale, unembeds to the logits.
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1)  # an int drops the pos dim
    assert lens.shape == (n + 1, len(PROMPTS), model.cfg.d_model)
    assert_close(lens[-1] @ model.W_U, logits[:, -1])
    scaled = cache.accumulated_resid(layer=1, apply_ln=True)
    assert_close(scaled[1], cache["resid_pre", 1] / cache["scale", 1, "ln1"])


def test_decompose_resid_sums_to_the_residual(model, run):
    _, _, cache = run
    n = model.cfg.n_layers
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed"] + [f"{l}_{k}_out" for l in range(n) for k in ("attn", "mlp")]
    assert_close(parts.sum(0), cache["resid_post", -1])
    assert_close(cache.decompose_resid(layer=2).sum(0), cache["resid_pre", 2])
    assert_close(cache.decompose_resid(layer=2, mlp_input=True).sum(0), cache["resid_mid", 2])
    attn_only = cache.decompose_resid(mode="attn", incl_embeds=False)
    assert attn_only.shape[0] == n
    assert_close(attn_only.sum(0), sum(cache["attn_out", l] for l in range(n)))
    normed = cache.decompose_resid(layer=1, apply_ln=True)
    assert_close(normed.sum(0), cache["normalized", 1, "ln1"])


def test_stack_head_results(model, run):
    _, _, cache = run
    n, h = model.cfg.n_layers, model.cfg.n_heads
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert labels[:3] == ["L0H0", "L0H1", "L0H2"] and len(labels) == n * h
    assert heads.shape == (n * h, *cache["resid_post", 0].shape)
    for l in range(n):
        assert_close(heads[l * h:(l + 1) * h].sum(0), cache["attn_out", l], what=f"layer {l}")
    with_rest, rest_labels = cache.stack_head_results(layer=2, incl_remainder=True, return_labels=True)
    assert rest_labels[-1] == "remainder"
    assert_close(with_rest.sum(0), cache["resid_post", 1])
    assert cache.stack_head_results(layer=0).shape[0] == 0


def test_head_results_computed_locally_equal_the_servers(model, run):
    tokens, _, cache = run
    model.set_use_attn_result(True)
    _, served = model.run_with_cache(tokens, names_filter=lambda n: "hook_result" in n or "hook_z" in n)
    local = cache.stack_head_results(pos_slice=(1, 4))
    remote = served.stack_head_results(pos_slice=(1, 4))
    assert_close(local, remote)


def test_logit_attrs_sum_to_the_logits(model, run):
    tokens, logits, cache = run
    answer = tokens[:, -1]
    wrong = tokens[:, 1]
    parts = cache.decompose_resid(pos_slice=-1)  # [components, batch, d_model]
    attrs = cache.logit_attrs(parts, answer, pos_slice=-1)
    assert attrs.shape == (parts.shape[0], len(PROMPTS))
    assert_close(attrs.sum(0), logits[torch.arange(len(PROMPTS)), -1, answer])
    diff = cache.logit_attrs(parts, answer, incorrect_tokens=wrong, pos_slice=-1)
    expected = logits[torch.arange(2), -1, answer] - logits[torch.arange(2), -1, wrong]
    assert_close(diff.sum(0), expected)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(parts, answer, incorrect_tokens=wrong[:1], pos_slice=-1)


def test_apply_ln_to_stack_uses_the_right_scale(model, run):
    _, _, cache = run
    stack = cache.decompose_resid(layer=3, mlp_input=True)
    assert_close(cache.apply_ln_to_stack(stack, layer=3, mlp_input=True).sum(0), cache["normalized", 3, "ln2"])
    final = cache.accumulated_resid()
    recomputed = cache.apply_ln_to_stack(final, recompute_ln=True)
    assert_close(recomputed[-1], cache["normalized"])
    one_row = cache.apply_ln_to_stack(final, batch_slice=1)
    assert one_row.shape == final[:, 1].shape
    assert_close(one_row[-1], cache["normalized"][1])


def test_neuron_results(model, run):
    _, _, cache = run
    per_neuron = cache.get_neuron_results(1, pos_slice=-1)
    assert per_neuron.shape == (2, model.cfg.d_mlp, model.cfg.d_model)
    assert_close(per_neuron.sum(-2), cache["mlp_out", 1][:, -1])
    stack, labels = cache.stack_neuron_results(2, pos_slice=(-2, None), return_labels=True, incl_remainder=True)
    assert labels[0] == "L0N0" and labels[-1] == "remainder" and len(labels) == 2 * model.cfg.d_mlp + 1
    assert stack.shape == (len(labels), 2, 2, model.cfg.d_model)
    assert_close(stack.sum(0), cache["resid_post", 1][:, -2:])


def test_whole_cache_transforms(model):
    tokens = model.to_tokens("Hello there")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n or n.endswith("scale"))
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (model.cfg.n_layers, *cache["resid_post", 0].shape)
    batch_row = cache.apply_slice_to_batch_dim(0)
    assert batch_row.has_batch_dim is False and batch_row["resid_pre", 0].dim() == 2
    cache.remove_batch_dim()
    assert cache["resid_pre", 2].shape == (tokens.shape[1], model.cfg.d_model)
    assert_close(cache.accumulated_resid(apply_ln=True)[-1], batch_row["resid_post", -1] / batch_row["scale"])
    assert cache.to("cpu") is cache
    with pytest.raises(ValueError):
        model.run_with_cache(model.to_tokens(["a", "b"]), names_filter="hook_embed")[1].remove_batch_dim()
