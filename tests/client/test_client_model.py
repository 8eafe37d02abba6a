"""HookedTransformer against the independent reference: forward, caches, tokens, weights.

Every numeric comparison is within 1e-4 of tests/reference/llama_reference.py on the same weights.
"""
import pytest
import torch

import remotelens
from remotelens import utils
from client_helpers import ATOL, assert_close

PROMPT = "The cat sat on the mat."
PROMPTS = ["The cat sat on the mat.", "Hello", "A dog ran to the park and back"]


def test_config_matches_the_checkpoint(model, reference):
    c, r = model.cfg, reference.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, c.d_mlp, c.d_vocab) == \
        (r.n_layers, r.d_model, r.n_heads, r.n_kv_heads, r.d_head, r.d_mlp, r.d_vocab)
    assert c.n_ctx == r.max_position_embeddings and c.dtype == torch.float32
    assert c.model_name == "remotelens-demo" and c.device == "cpu"
    assert list(model.hook_dict) == reference.hook_names
    assert model.hook_dict["blocks.1.attn.hook_k"].shape == (-1, -1, r.n_kv_heads, r.d_head)
    assert model.blocks[1].attn.hook_z is model.hook_dict["blocks.1.attn.hook_z"]
    assert model.ln_final.hook_scale.name == "ln_final.hook_scale"
    assert model.mod_dict["blocks.2.mlp"].hook_post.name == "blocks.2.mlp.hook_post"


@pytest.mark.parametrize("form", ["tokens", "str", "1d"])
def test_forward_logits_match_reference(model, reference, form):
    tokens = model.to_tokens(PROMPT)
    arg = {"tokens": tokens, "str": PROMPT, "1d": tokens[0]}[form]
    expected, _ = reference.forward(tokens)
    assert_close(model(arg), expected, what=form)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_text_is_padded_and_masked(model, reference, side):
    tokens, mask = model._encode(PROMPTS, padding_side=side)
    logits = model(PROMPTS, padding_side=side)
    expected, _ = reference.forward(tokens, attention_mask=mask)
    real = mask.bool()
    assert_close(logits[real], expected[real], what=f"{side}-padded logits")
    alone, _ = reference.forward(model.to_tokens(PROMPTS[1]))
    assert_close(logits[1][real[1]], alone[0], what="padded row vs the row alone")


def test_left_padded_token_input_infers_the_mask(model, reference):
    model.tokenizer.padding_side = "left"
    tokens = model.to_tokens(PROMPTS)
    assert tokens[1, 0] == model.tokenizer.pad_token_id
    _, mask = model._encode(PROMPTS, padding_side="left")
    expected, _ = reference.forward(tokens, attention_mask=mask)
    assert_close(model(tokens)[mask.bool()], expected[mask.bool()])


def test_loss_both_and_none(model, reference):
    tokens, mask = model._encode(PROMPTS, padding_side="right")
    ref_logits, _ = reference.forward(tokens, attention_mask=mask)
    loss = model(PROMPTS, return_type="loss")
    assert loss.shape == () and abs(loss.item() - utils.lm_cross_entropy_loss(ref_logits, tokens, mask).item()) < ATOL
    per_token = model(PROMPTS, return_type="loss", loss_per_token=True)
    assert_close(per_token, utils.lm_cross_entropy_loss(ref_logits, tokens, mask, per_token=True))
    assert (per_token[1, 5:] == 0).all()  # masked targets contribute nothing, as in TL
    both = model(PROMPT, return_type="both")
    assert isinstance(both, remotelens.Output)
    logits, loss = both
    assert abs(loss.item() - model(PROMPT, return_type="loss").item()) < ATOL
    assert_close(logits, model(PROMPT))
    assert model(PROMPT, return_type=None) is None
    with pytest.raises(ValueError, match="return_type"):
        model(PROMPT, return_type="probs")


def test_run_with_cache_every_hook_matches_reference(model, reference):
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)  # use_attn_in: not with grouped-query attention (TL3)
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    _, mask = model._encode(PROMPTS, padding_side="left")
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    ref_logits, ref_cache = reference.forward(tokens, attention_mask=mask,
                                              flags=["use_split_qkv_input", "use_hook_mlp_in"])
    names = [n for n in reference.hook_names if n in ref_cache]
    assert list(cache.keys()) == names
    real = mask.bool()
    assert_close(logits[real], ref_logits[real], what="logits")
    for name in names:
        got, want = cache[name], ref_cache[name]
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            rows = real[:, None, :, None].expand_as(want)  # real query positions
            assert_close(got[rows], want[rows], what=name)
        elif got.dim() >= 2 and got.shape[1] == tokens.shape[1]:
            assert_close(got[real], want[real], what=name)
        else:
            assert_close(got, want, what=name)


def test_names_filter_forms(model):
    tokens = model.to_tokens(PROMPT)
    _, by_str = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    assert list(by_str.keys()) == ["blocks.1.hook_resid_post"]
    _, by_list = model.run_with_cache(tokens, names_filter=["blocks.2.attn.hook_z", "hook_embed"])
    assert list(by_list.keys()) == ["hook_embed", "blocks.2.attn.hook_z"]  # forward order
    _, by_fn = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert list(by_fn.keys()) == [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, everything = model.run_with_cache(tokens)
    # No opt-in hook point by default: hook_result, hook_attn_in, hook_q/k/v_input, hook_mlp_in.
    assert len(everything) == len(model.hook_dict) - 6 * model.cfg.n_layers
    assert_close(by_str["resid_post", 1], everything["resid_post", 1])  # fast path vs full cache
    with pytest.raises(ValueError, match="not hook points"):
        model.run_with_cache(tokens, names_filter=["blocks.0.hook_pos_embed"])


@pytest.mark.parametrize("pos_slice", [-1, 2, (1, 4), [0, 3, 5], (0, 8, 2), torch.tensor([1, 2])])
def test_pos_slice_on_server_and_client(model, pos_slice):
    tokens = model.to_tokens(PROMPT)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_q", "blocks.1.attn.hook_rot_k",
             "blocks.2.attn.hook_pattern", "blocks.0.ln1.hook_scale"]
    _, full = model.run_with_cache(tokens, names_filter=names)
    _, sliced = model.run_with_cache(tokens, names_filter=names, pos_slice=pos_slice)
    s = utils.Slice.unwrap(pos_slice)
    for name in names:
        dim = -3 if name.endswith(("hook_q", "hook_rot_k")) else -2
        assert_close(sliced[name], s.apply(full[name], dim=dim), what=name)


def test_remove_batch_dim_device_and_dict_output(model):
    tokens = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre", remove_batch_dim=True)
    assert cache.has_batch_dim is False and cache["resid_pre", 0].shape == (tokens.shape[1], model.cfg.d_model)
    out, plain = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre",
                                      return_cache_object=False, device="cpu")
    assert type(plain) is dict and list(plain) == ["blocks.0.hook_resid_pre"]
    assert torch.equal(plain["blocks.0.hook_resid_pre"][0], cache["resid_pre", 0])


@pytest.mark.parametrize("stop", [0, 1, 3, -1, -3])
def test_stop_at_layer_returns_the_residual(model, reference, stop):
    tokens = model.to_tokens(PROMPT)
    _, ref_cache = reference.forward(tokens)
    block = stop % model.cfg.n_layers
    assert_close(model(tokens, stop_at_layer=stop), ref_cache[f"blocks.{block}.hook_resid_pre"])


@pytest.mark.parametrize("start", [0, 2, -1])
def test_start_at_layer_from_a_residual(model, reference, start):
    tokens = model.to_tokens(PROMPT)
    ref_logits, ref_cache = reference.forward(tokens)
    resid = ref_cache[f"blocks.{start % model.cfg.n_layers}.hook_resid_pre"]
    assert_close(model(resid, start_at_layer=start), ref_logits)
    loss = model(resid, start_at_layer=start, tokens=tokens, return_type="loss")
    assert abs(loss.item() - utils.lm_cross_entropy_loss(ref_logits, tokens).item()) < ATOL
    with pytest.raises(ValueError, match="tokens must be passed"):
        model(resid, start_at_layer=start, return_type="loss")


def test_start_at_layer_with_a_padding_mask(model, reference):
    # A left-padded batch entering at block 2 keeps its padding mask.
    tokens, mask = model._encode(PROMPTS, padding_side="left")
    ref_logits, ref_cache = reference.forward(tokens, attention_mask=mask)
    logits = model(ref_cache["blocks.2.hook_resid_pre"], start_at_layer=2, attention_mask=mask)
    assert_close(logits[mask.bool()], ref_logits[mask.bool()])


def test_token_helpers(model):
    tokens = model.to_tokens(PROMPT)
    assert tokens.dtype == torch.int64 and tokens[0, 0] == model.cfg.bos_token_id
    assert model.to_tokens(PROMPT, prepend_bos=False).shape[1] == tokens.shape[1] - 1
    assert model.to_string(tokens[0, 1:]) == PROMPT
    assert model.to_string(tokens[:, 1:]) == [PROMPT]
    assert model.to_string(tokens[0, 1:].tolist()) == PROMPT
    str_tokens = model.to_str_tokens(PROMPT)
    assert "".join(str_tokens[1:]) == PROMPT and len(str_tokens) == tokens.shape[1]
    assert model.to_str_tokens(tokens) == str_tokens == model.to_str_tokens(tokens[0].numpy())
    assert model.to_str_tokens([PROMPT, "Hello"]) == [str_tokens, model.to_str_tokens("Hello")]
    token = model.to_single_token(str_tokens[2])
    assert token == tokens[0, 2] and model.to_single_str_token(token) == str_tokens[2]
    padded = model.to_tokens(PROMPTS)
    assert padded.shape == (3, max(len(model.to_str_tokens(p)) for p in PROMPTS))
    assert (padded[1, len(model.to_str_tokens("Hello")):] == model.tokenizer.pad_token_id).all()
    left = model.to_tokens(PROMPTS, padding_side="left")
    assert left[1, -1] == padded[1, len(model.to_str_tokens("Hello")) - 1]
    long_text = "the cat " * 400
    assert model.to_tokens(long_text).shape[1] == model.cfg.n_ctx  # truncated by default
    assert model.to_tokens(long_text, truncate=False).shape[1] > model.cfg.n_ctx


def test_get_token_position(model):
    text = "the cat and the dog"
    str_tokens = model.to_str_tokens(text)
    the = str_tokens.index("the") if "the" in str_tokens else 1
    token = model.to_tokens(text)[0, the].item()
    positions = [i for i, t in enumerate(model.to_tokens(text)[0].tolist()) if t == token]
    assert model.get_token_position(token, text) == positions[0]
    assert model.get_token_position(token, text, mode="last") == positions[-1]
    assert model.get_token_position(token, model.to_tokens(text)) == positions[0]
    with pytest.raises(AssertionError):
        model.get_token_position(model.cfg.eos_token_ids[0], text)
    with pytest.raises(ValueError):
        model.get_token_position(token, text, mode="middle")


def test_weights_match_checkpoint_and_fold_norms(model, reference):
    c, w = model.cfg, reference.w
    assert torch.equal(model.W_E, w["model.embed_tokens.weight"])
    layer, group = 2, c.n_heads // c.n_key_value_heads
    p = f"model.layers.{layer}."
    ln1, ln2 = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
    raw_q = model.get_weight("W_Q", layer)
    assert torch.equal(raw_q, w[p + "self_attn.q_proj.weight"].reshape(c.n_heads, c.d_head, c.d_model).transpose(1, 2))
    assert model.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert_close(model.W_Q[layer], raw_q * ln1[None, :, None])
    raw_k = w[p + "self_attn.k_proj.weight"].reshape(c.n_key_value_heads, c.d_head, c.d_model).transpose(1, 2)
    assert model._W_K.shape == (c.n_layers, c.n_key_value_heads, c.d_model, c.d_head)
    assert_close(model._W_K[layer], raw_k * ln1[None, :, None])
    assert model.W_K.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert torch.equal(model.W_K[layer, group + 1], model._W_K[layer, 1])  # head h reads kv head h // group
    assert_close(model.W_O[layer], w[p + "self_attn.o_proj.weight"].reshape(c.d_model, c.n_heads, c.d_head).permute(1, 2, 0))
    assert_close(model.W_in[layer], w[p + "mlp.up_proj.weight"].T * ln2[:, None])
    assert_close(model.W_gate[layer], w[p + "mlp.gate_proj.weight"].T * ln2[:, None])
    assert_close(model.W_out[layer], w[p + "mlp.down_proj.weight"].T)
    assert_close(model.W_U, reference.W_U.T * w["model.norm.weight"][:, None])
    assert torch.equal(model.blocks[layer].attn.W_Q, model.W_Q[layer])
    assert torch.equal(model.blocks[layer].ln2.w, ln2) and torch.equal(model.ln_final.w, w["model.norm.weight"])
    assert model.b_O.shape == (c.n_layers, c.d_model) and not model.b_O.any()


def test_folded_weights_reproduce_activations(model):
    # With folded norms, normalized activations times weights give the next activations.
    tokens = model.to_tokens(PROMPT)
    logits, cache = model.run_with_cache(tokens)
    assert_close(cache["normalized"] @ model.W_U, logits)
    q = torch.einsum("bpm,hmd->bphd", cache["normalized", 1, "ln1"], model.W_Q[1])
    assert_close(q, cache["q", 1])
    k = torch.einsum("bpm,hmd->bphd", cache["normalized", 1, "ln1"], model._W_K[1])
    assert_close(k, cache["k", 1])
    assert_close(cache["normalized", 3, "ln2"] @ model.W_gate[3], cache["pre", 3])
    assert_close(cache["post", 3] @ model.W_out[3], cache["mlp_out", 3])


def test_unfolded_weights(demo_server, reference):
    with remotelens.HookedTransformer.from_server(demo_server.address, fold_ln=False,
                                                  center_unembed=False) as raw:
        assert raw.cfg.normalization_type == "RMS"
        assert torch.equal(raw.W_U, reference.W_U.T)
        assert torch.equal(raw.W_in[0], reference.w["model.layers.0.mlp.up_proj.weight"].T)


def test_stored_cache_lazy_download_and_delete(model):
    tokens = model.to_tokens(PROMPT)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    _, local = model.run_with_cache(tokens, names_filter=names)
    _, stored = model.run_with_cache(tokens, names_filter=names, store=True, download=False)
    assert stored.handle and stored.session_id == model.session_id
    assert list(stored.keys()) == names and len(stored) == 2
    assert torch.equal(stored["pattern", 1], local["pattern", 1])
    assert all(torch.equal(a, b) for a, b in zip(stored.values(), local.values()))
    _, sliced = model.run_with_cache(tokens, names_filter=names, store=True, download=False,
                                     pos_slice=[0, 2])
    assert torch.equal(sliced["resid_post", 0], local["resid_post", 0][:, [0, 2]])
    assert stored.delete() > 0 and stored.handle is None
    with pytest.raises(remotelens.NotFoundError):
        model._fetch_cache(model.session_id, sliced.handle + "-missing", names)


def test_outputs_follow_model_to(model):
    model.to("meta")  # any device name works for where outputs go; "meta" needs no GPU
    logits = model(PROMPT)
    assert logits.device.type == "meta"
    seen = []
    model.run_with_hooks(PROMPT, fwd_hooks=[("hook_embed", lambda x, hook: seen.append(x.device.type))])
    assert seen == ["meta"]  # hook functions get activations where the model's outputs go
    _, cache = model.run_with_cache(PROMPT, names_filter="hook_embed")
    assert cache["embed"].device.type == "meta"
    model.to("cpu")
    assert model(PROMPT).device.type == "cpu"


def test_layer_range_edges(model, reference):
    # TL: start_at_layer == n_layers runs only ln_final and the unembedding; stop_at_layer ==
    # n_layers returns the last block's output.
    tokens = model.to_tokens(PROMPT)
    ref_logits, ref_cache = reference.forward(tokens)
    n = model.cfg.n_layers
    final = ref_cache[f"blocks.{n - 1}.hook_resid_post"]
    assert_close(model(tokens, stop_at_layer=n), final)
    _, cache = model.run_with_cache(tokens, stop_at_layer=n, names_filter=lambda n: "resid" in n,
                                    pos_slice=-1)
    assert "ln_final.hook_scale" not in cache and cache["resid_post", -1].shape[1] == 1
    assert_close(model(final, start_at_layer=n), ref_logits)
    seen = []
    model.add_hook(f"blocks.{n - 1}.hook_resid_post", lambda x, hook: seen.append(hook.name))
    model.add_hook("ln_final.hook_scale", lambda x, hook: seen.append(hook.name))
    model(final, start_at_layer=n)
    assert seen == ["ln_final.hook_scale"]  # hooks before the start do not fire, as in TL
    seen.clear()
    model(tokens, stop_at_layer=n)
    assert seen == [f"blocks.{n - 1}.hook_resid_post"]  # nor hooks after the stop


def test_large_downloads_show_a_progress_bar(model, capsys):
    tokens = model.to_tokens(PROMPT)
    model.run_with_cache(tokens, names_filter="hook_embed")
    assert "activations" not in capsys.readouterr().err  # small: no bar
    model.progress_bar_min_bytes = 1000
    try:
        model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
        assert "activations" in capsys.readouterr().err
        model._weights.clear()
        model.W_E
        assert "W_E" in capsys.readouterr().err
    finally:
        del model.progress_bar_min_bytes  # back to the class default
