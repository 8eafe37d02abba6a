"""HookedTransformer's analysis surface (issue 12, item 1), checked against the independent
reference (tests/reference) or TransformerLens's documented behaviour.

Each test names the TransformerLens source or test it follows. Sources were read at
TransformerLensOrg/TransformerLens@4cd36aaeb5dad931d085bd5d46a12b402fe15272 (TL3 API, still in
transformer_lens/HookedTransformer.py there): HookedTransformer.py, ActivationCache.py,
FactoredMatrix.py, utilities/matrix.py, patching.py, weight_processing.py,
components/abstract_attention.py.
"""
import logging

import pytest
import torch

import remotelens
from remotelens import FactoredMatrix, ops, patching, utils
from client_helpers import assert_close

from tests.reference.llama_reference import left_pad

PROMPT = "The cat sat on the mat."


def centred(logits):
    return logits - logits.mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def tl_model(demo_server):
    """from_server with its defaults (fold_ln and center_unembed, like from_pretrained)."""
    model = remotelens.HookedTransformer.from_server(demo_server.address)
    yield model
    model.close()


@pytest.fixture(scope="module")
def raw_model(demo_server):
    model = remotelens.HookedTransformer.from_server_no_processing(demo_server.address)
    yield model
    model.close()


@pytest.fixture
def run(model, reference):
    tokens = model.to_tokens(PROMPT)
    logits, cache = model.run_with_cache(tokens)
    ref_logits, ref_cache = reference.forward(tokens)
    return tokens, logits, cache, ref_logits, ref_cache


# ------------------------------------------------------------------ processing defaults (item 5)

def test_from_server_defaults_match_from_pretrained(tl_model, raw_model):
    # HookedTransformer.from_pretrained(fold_ln=True, center_writing_weights=True,
    # center_unembed=True); from_pretrained_no_processing turns all three off. For RMS models
    # fold_ln makes the norms RMSPre (load_and_process_state_dict).
    assert tl_model.cfg.fold_ln and tl_model.cfg.center_unembed
    assert tl_model.cfg.normalization_type == "RMSPre"
    assert not raw_model.cfg.fold_ln and not raw_model.cfg.center_unembed
    assert raw_model.cfg.normalization_type == "RMS"


def test_center_unembed_shifts_logits_by_a_per_position_constant(tl_model, reference):
    # weight_processing.ProcessWeights.center_unembed: W_U -= W_U.mean(-1); "changes the logits
    # but not the log probs". b_U is zero, so logits shift by their mean over the vocabulary.
    tokens = tl_model.to_tokens(PROMPT)
    ref_logits, _ = reference.forward(tokens)
    logits = tl_model(tokens)
    assert_close(logits, centred(ref_logits))
    assert_close(logits.mean(-1), torch.zeros(logits.shape[:-1]))
    assert_close(logits.log_softmax(-1), ref_logits.log_softmax(-1))
    loss = tl_model(tokens, return_type="loss")
    assert abs(loss.item() - utils.lm_cross_entropy_loss(ref_logits, tokens).item()) < 1e-4
    both = tl_model(tokens, return_type="both")
    assert_close(both.logits, centred(ref_logits))


def test_center_unembed_centres_W_U_rows(tl_model, raw_model, reference):
    # ProcessWeights.center_unembed centres W_U along d_vocab (after fold_ln folded ln_final).
    assert_close(tl_model.W_U.mean(-1), torch.zeros(tl_model.cfg.d_model), atol=1e-6)
    folded = reference.W_U.T * reference.w["model.norm.weight"][:, None]
    assert_close(tl_model.W_U, folded - folded.mean(-1, keepdim=True), atol=1e-6)
    assert torch.equal(raw_model.W_U, reference.W_U.T)


def test_no_processing_gives_raw_logits_and_weights(raw_model, reference):
    # from_pretrained_no_processing: the checkpoint's weights and logits.
    tokens = raw_model.to_tokens(PROMPT)
    ref_logits, _ = reference.forward(tokens)
    assert_close(raw_model(tokens), ref_logits)
    assert torch.equal(raw_model.W_Q[0, 0], reference.w["model.layers.0.self_attn.q_proj.weight"]
                       [:raw_model.cfg.d_head].T)


def test_processing_flags_can_be_mixed(demo_server, reference):
    with remotelens.HookedTransformer.from_server(demo_server.address, fold_ln=False) as m:
        assert m.cfg.center_unembed and not m.cfg.fold_ln
        assert_close(m.W_U, reference.W_U.T - reference.W_U.T.mean(-1, keepdim=True), atol=1e-6)
    with pytest.raises(NotImplementedError, match="refactor_factored_attn_matrices"):
        remotelens.HookedTransformer.from_server(demo_server.address,
                                                 refactor_factored_attn_matrices=True)


def test_backward_through_centred_logits(tl_model, reference):
    # With a centred W_U a metric's gradient reaches the model through the centred logits:
    # metric(model(tokens)).backward() must match the reference on centred logits.
    tokens = tl_model.to_tokens(PROMPT)
    grads = {}

    def metric(logits):
        return logits[0, -1, 7] + 0.5 * logits[0, 2, 3]

    tl_model.add_hook("blocks.1.hook_resid_pre", lambda g, hook: grads.setdefault(hook.name, g.clone()), "bwd")
    try:
        value = metric(tl_model(tokens))
        value.backward()
    finally:
        tl_model.reset_hooks()
    anchor = torch.zeros(*tokens.shape, reference.config.d_model, requires_grad=True)
    ref_logits, ref_cache = reference.forward(tokens, ops=[{"hook": "hook_embed", "op": "add", "tensor": "a"}],
                                              hook_tensors={"a": anchor})
    ref_value = metric(centred(ref_logits))
    (ref_grad,) = torch.autograd.grad(ref_value, [ref_cache["blocks.1.hook_resid_pre"]])
    assert abs(value.item() - ref_value.item()) < 1e-4
    assert_close(grads["blocks.1.hook_resid_pre"], ref_grad)


def test_nothing_printed_about_layernorm_centring(demo_server, capsys, caplog):
    # weight_processing.process_weights centres writing weights only for LN/LNPre and says
    # nothing for RMS models; remotelens prints nothing either.
    with caplog.at_level(logging.DEBUG):
        with remotelens.HookedTransformer.from_server(demo_server.address,
                                                      center_writing_weights=True) as m:
            m.W_U  # processing happens lazily: trigger it
            m.W_Q
    out = capsys.readouterr()
    text = (out.out + out.err + caplog.text).lower()
    assert "layernorm" not in text and "center" not in text and "centre" not in text


def test_fold_ln_leaves_hook_normalized_unchanged(tl_model, raw_model):
    # components/rms_norm.py and rms_norm_pre.py both hook x / scale (before any weight), so
    # folding changes weights only, never cached activations.
    tokens = tl_model.to_tokens(PROMPT)
    names = ["blocks.1.ln1.hook_normalized", "ln_final.hook_normalized", "blocks.2.attn.hook_q"]
    _, a = tl_model.run_with_cache(tokens, names_filter=names)
    _, b = raw_model.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ callable submodules (item 1)

@pytest.mark.parametrize("which", ["model", "tl_model", "raw_model"])
def test_logit_lens_idiom_matches_reference(which, request, reference):
    # The logit lens of TL's accumulated_resid docstring: model.unembed(model.ln_final(resid)),
    # correct with fold_ln on or off; centred when center_unembed.
    m = request.getfixturevalue(which)
    tokens = m.to_tokens(PROMPT)
    _, cache = m.run_with_cache(tokens)
    _, ref_cache = reference.forward(tokens)
    for layer in range(m.cfg.n_layers):
        lens = m.unembed(m.ln_final(cache["resid_post", layer]))
        expected = reference.lens(ref_cache[f"blocks.{layer}.hook_resid_post"])
        if m.cfg.center_unembed:
            expected = centred(expected)
        assert_close(lens, expected, what=f"{which} layer {layer}")


def test_unembed_of_final_norm_is_the_logits(tl_model):
    # HookedTransformer.forward: logits = unembed(ln_final(residual)).
    tokens = tl_model.to_tokens(PROMPT)
    logits, cache = tl_model.run_with_cache(tokens)
    assert_close(tl_model.unembed(tl_model.ln_final(cache["resid_post", -1])), logits)
    assert torch.equal(tl_model.unembed.W_U, tl_model.W_U)
    assert torch.equal(tl_model.unembed.b_U, torch.zeros(tl_model.cfg.d_vocab))


def test_ln_final_with_and_without_folding(tl_model, raw_model, reference, run):
    # fold_ln: ln_final is RMSNormPre (x / rms, the hook_normalized value); without: RMSNorm
    # (x / rms * w).
    tokens, _, cache, _, ref_cache = run
    resid = cache["resid_post", -1]
    assert_close(tl_model.ln_final(resid), cache["normalized"])
    assert_close(raw_model.ln_final(resid), cache["normalized"] * reference.w["model.norm.weight"])


def test_block_norms_are_callable(model, run):
    # blocks[L].ln1 / ln2 are the block's RMSNorm(Pre) modules.
    _, _, cache, _, _ = run
    for layer in (0, 2):
        assert_close(model.blocks[layer].ln1(cache["resid_pre", layer]), cache["normalized", layer, "ln1"])
        assert_close(model.blocks[layer].ln2(cache["resid_mid", layer]), cache["normalized", layer, "ln2"])


def test_embed_is_W_E_of_tokens(model, run):
    # components/embed.py: Embed(tokens) = W_E[tokens]; hook_embed holds it.
    tokens, _, cache, _, ref_cache = run
    assert_close(model.embed(tokens), ref_cache["hook_embed"])
    assert torch.equal(model.embed(tokens), cache["hook_embed"])
    assert torch.equal(model.embed.W_E, model.W_E)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_calling_a_block_runs_it_on_the_server(model, run, layer):
    # TransformerBlock.forward(resid_pre) -> resid_post.
    _, _, cache, _, ref_cache = run
    n = model.cfg.n_layers
    l = layer % n
    out = model.blocks[l](cache["resid_pre", l])
    assert_close(out, ref_cache[f"blocks.{l}.hook_resid_post"])


def test_calling_a_block_applies_its_hooks(model, run):
    # Calling a TL module fires its hook points.
    _, _, cache, _, ref_cache = run
    resid = cache["resid_pre", 1]
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", ops.zero())]):
        patched = model.blocks[1](resid)
    assert_close(patched, cache["resid_mid", 1])


def test_input_to_embed(model, run):
    # HookedTransformer.input_to_embed -> (residual, tokens, shortformer_pos_embed, attention_mask);
    # no mask unless padding is on the left; rotary models have no shortformer embedding.
    tokens, _, cache, _, _ = run
    residual, toks, shortformer, mask = model.input_to_embed(PROMPT)
    assert torch.equal(toks, tokens) and shortformer is None and mask is None
    assert_close(residual, cache["hook_embed"])
    model.tokenizer.padding_side = "left"
    residual, toks, _, mask = model.input_to_embed(["A b", "A longer text here"])
    assert mask is not None and mask.shape == toks.shape and int(mask[0, 0]) == 0 and bool(mask[1].all())
    assert residual.shape == (*toks.shape, model.cfg.d_model)


def test_input_to_embed_applies_hook_embed_hooks(model, run):
    # input_to_embed runs hook_embed (with its hooks) on the embedding.
    tokens, _, cache, _, _ = run
    with model.hooks(fwd_hooks=[("hook_embed", ops.scale(2.0))]):
        residual, _, _, _ = model.input_to_embed(tokens)
    assert_close(residual, 2 * cache["hook_embed"])


def test_bridge_logit_lens_with_tl4_names(demo_server, reference):
    # TL4 TransformerBridge: no weight processing until enable_compatibility_mode(); the same
    # callable modules (embed, ln_final, unembed) work with TL4 cache keys.
    bridge = remotelens.TransformerBridge.from_server(demo_server.address)
    try:
        tokens = bridge.to_tokens(PROMPT)
        _, cache = bridge.run_with_cache(tokens, names_filter="blocks.1.hook_out")
        _, ref_cache = reference.forward(tokens)
        lens = bridge.unembed(bridge.ln_final(cache["blocks.1.hook_out"]))
        assert_close(lens, reference.lens(ref_cache["blocks.1.hook_resid_post"]))
        assert bridge.embed.hook_out is bridge.hook_dict["embed.hook_out"]
        bridge.enable_compatibility_mode()
        lens = bridge.unembed(bridge.ln_final(cache["blocks.1.hook_out"]))
        assert_close(lens, centred(reference.lens(ref_cache["blocks.1.hook_resid_post"])))
    finally:
        bridge.close()


# ------------------------------------------------------------------ circuits (item 2)

def test_QK_and_OV_are_factored_circuits(model):
    # HookedTransformer.QK = FactoredMatrix(W_Q, W_K^T), OV = FactoredMatrix(W_V, W_O);
    # W_K/W_V repeat the key/value heads (GQA), so there are n_heads circuits per layer.
    c = model.cfg
    QK, OV = model.QK, model.OV
    assert isinstance(QK, FactoredMatrix)
    assert QK.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model) and QK.mdim == c.d_head
    assert_close(QK.AB, model.W_Q @ model.W_K.transpose(-2, -1), atol=1e-5)
    assert_close(OV.AB, model.W_V @ model.W_O, atol=1e-5)
    assert_close(model.blocks[2].attn.QK.AB, QK.AB[2], atol=1e-5)
    assert_close(model.blocks[2].attn.OV.AB, OV.AB[2], atol=1e-5)
    group = c.n_heads // c.n_key_value_heads
    assert torch.equal(model.W_K[1, 0], model.W_K[1, group - 1])  # one key head, repeated


def test_factored_matrix_svd_norm_eigenvalues(model):
    # FactoredMatrix.svd: U diag(S) V^T == AB; norm = Frobenius; eigenvalues = those of BA
    # (AB's non-zero ones). Compare tests/unit/test_factored_matrix.py.
    OV = model.OV[1, 3]
    full = OV.AB.double()
    U, S, V = OV.svd()
    assert U.shape == (model.cfg.d_model, model.cfg.d_head) and V.shape == U.shape
    assert_close(U @ torch.diag(S) @ V.T, full, atol=1e-5)
    assert_close(S, torch.linalg.svdvals(full)[:model.cfg.d_head], atol=1e-5)
    assert_close(OV.norm(), torch.linalg.matrix_norm(full), atol=1e-5)
    eig = OV.eigenvalues
    assert eig.shape == (model.cfg.d_head,) and eig.is_complex()
    full_eig = torch.linalg.eigvals(full)
    top = full_eig[full_eig.abs().argsort(descending=True)][:model.cfg.d_head]
    assert_close(eig.abs().sort().values, top.abs().sort().values, atol=1e-4)
    assert_close(model.OV.norm(), torch.linalg.matrix_norm(model.OV.AB), atol=1e-4)


def test_factored_matrix_products_and_indexing():
    # FactoredMatrix __matmul__/__rmatmul__/T/__getitem__/__mul__ (FactoredMatrix.py).
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    B = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    M = FactoredMatrix(A, B)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(7, 6, generator=g, dtype=torch.float64)
    assert_close((M @ x).AB, M.AB @ x, atol=1e-9)
    assert_close((y @ M).AB, y @ M.AB, atol=1e-9)
    assert_close(M @ x[:, 0], M.AB @ x[:, 0], atol=1e-9)  # a vector gives a tensor
    assert_close((M @ M.T).AB, M.AB @ M.AB.transpose(-2, -1), atol=1e-9)
    assert_close(M.T.AB, M.AB.transpose(-2, -1), atol=1e-9)
    assert_close((M * 2.0).AB, 2 * M.AB, atol=1e-9)
    assert_close(M[1].AB, M.AB[1], atol=1e-9)
    assert M[1, 2].shape == (1, 5) and M[1, 2, 3].shape == (1, 1)  # int on rows/cols keeps the dim
    assert_close(M[1, 2, 3].AB, M.AB[1, 2:3, 3:4], atol=1e-9)
    with pytest.raises(ValueError):
        M.BA  # not square


def test_factored_matrix_indexing_like_tl_unit_tests():
    # tests/unit/factored_matrix/test_get_item.py and test_constructor.py: leading indices
    # index both factors; extra indices pick rows/columns (negatives included, lists too);
    # leading dims broadcast; a mismatch is a RuntimeError naming it.
    g = torch.Generator().manual_seed(1)
    M = FactoredMatrix(torch.rand(2, 2, 2, 2, 2, generator=g), torch.rand(2, 2, 2, 2, 2, generator=g))
    assert torch.equal(M[:, 1].A, M.A[:, 1]) and torch.equal(M[(0, 1)].B, M.B[0, 1])
    for idx in [(0, 0, 0, -1), (0, 0, 0, 0, -1), (0, 0, 0, -1, -1), (0, 0, 0, 1)]:
        assert_close(M[idx].AB.squeeze(), M.AB[idx], atol=1e-6)
    rows = M[:, :, :, [0, 1], [0]]
    assert torch.equal(rows.A, M.A[:, :, :, [0, 1], :]) and torch.equal(rows.B, M.B[:, :, :, :, [0]])
    with pytest.raises(IndexError):
        M[(0, 1, 2)]
    with pytest.raises(ValueError):
        M[1, 1, 1, 1, 1, 1]
    f = FactoredMatrix(torch.ones(4, 5, 3), torch.ones(2, 1, 3, 7))
    assert (f.ldim, f.mdim, f.rdim) == (5, 3, 7) and f.has_leading_dims and f.shape == (2, 4, 5, 7)
    with pytest.raises(RuntimeError, match="[Mm]ismatch"):
        FactoredMatrix(torch.ones(9, 5, 3), torch.ones(2, 4, 3, 7))
    U, S, V = M.svd()
    even = M.make_even()
    assert_close(even.AB, M.AB, atol=1e-5)
    assert_close(even.A.transpose(-2, -1) @ even.A, torch.diag_embed(S), atol=1e-5)  # half the spectrum each
    # collapse_l / collapse_r drop an orthogonal factor: the Frobenius norm is kept.
    assert_close(torch.linalg.matrix_norm(M.collapse_l()), M.norm(), atol=1e-5)
    assert_close(torch.linalg.matrix_norm(M.collapse_r()), M.norm(), atol=1e-5)


def test_all_head_labels(model):
    # HookedTransformer.all_head_labels: "L{l}H{h}", layer-major.
    labels = model.all_head_labels()
    assert len(labels) == model.cfg.n_layers * model.cfg.n_heads
    assert labels[:2] == ["L0H0", "L0H1"] and labels[-1] == f"L{model.cfg.n_layers - 1}H{model.cfg.n_heads - 1}"


def test_accumulated_bias_is_zero_for_llama(model):
    # HookedTransformer.accumulated_bias sums b_O/b_out; Llama's are zero; mlp_input beyond
    # the final layer is an error.
    for layer, mlp_input in [(0, False), (2, True), (model.cfg.n_layers, False)]:
        bias = model.accumulated_bias(layer, mlp_input=mlp_input)
        assert bias.shape == (model.cfg.d_model,) and torch.equal(bias, torch.zeros(model.cfg.d_model))
    with pytest.raises(ValueError):
        model.accumulated_bias(model.cfg.n_layers, mlp_input=True)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores(model, mode):
    # HookedTransformer.all_composition_scores + utilities/matrix.composition_scores:
    # ||L R||_F / (||L||_F ||R||_F) with L = OV of the earlier head and R = QK, QK^T or OV of
    # the later head; zero unless the later head is in a later layer.
    c = model.cfg
    scores = model.all_composition_scores(mode)
    assert scores.shape == (c.n_layers, c.n_heads, c.n_layers, c.n_heads)
    left = model.OV.AB.double()
    right = {"Q": model.QK.AB, "K": model.QK.AB.transpose(-2, -1), "V": model.OV.AB}[mode].double()
    for l1, h1, l2, h2 in [(0, 0, 1, 3), (1, 5, 3, 7), (0, 7, 3, 0)]:
        L, R = left[l1, h1], right[l2, h2]
        expected = torch.linalg.matrix_norm(L @ R) / torch.linalg.matrix_norm(L) / torch.linalg.matrix_norm(R)
        assert abs(scores[l1, h1, l2, h2].item() - expected.item()) < 1e-4, (l1, h1, l2, h2)
    later = torch.arange(c.n_layers)[:, None] < torch.arange(c.n_layers)[None, :]
    assert torch.all(scores.permute(0, 2, 1, 3)[~later] == 0)
    assert torch.all(scores.permute(0, 2, 1, 3)[later] > 0)
    # The all-pairs utils.composition_scores (TL's formula, masked as TL masks it) agrees.
    right_fm = {"Q": model.QK, "K": model.QK.T, "V": model.OV}[mode]
    all_pairs = utils.composition_scores(model.OV, right_fm)
    assert all_pairs.shape == scores.shape
    assert_close(scores.permute(0, 2, 1, 3)[later], all_pairs.permute(0, 2, 1, 3)[later], atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.all_composition_scores("X")


# ------------------------------------------------------------------ ActivationCache (item 3)

def test_accumulated_resid_apply_ln_normalises_each_layer_by_its_own_rms(model, run, reference):
    # ActivationCache.accumulated_resid at 4cd36aa: apply_ln with layer == n_layers passes
    # recompute_ln=True, so each stream goes through ln_final with its own statistics (the
    # logit lens of every layer), not the final cached scale.
    tokens, _, cache, _, ref_cache = run
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    for i in range(n):
        x = ref_cache[f"blocks.{i}.hook_resid_pre"]
        own = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
        assert_close(stack[i], own, what=labels[i])
        assert_close(stack[i] @ model.W_U, reference.lens(x), what=f"lens {labels[i]}")
    assert_close(stack[-1], cache["normalized"])
    # Not the cached final scale (which only the last stream has).
    assert not torch.allclose(stack[0], cache["resid_pre", 0] / cache["scale"], atol=1e-3)


def test_accumulated_resid_apply_ln_before_the_end_uses_the_cached_scale(model, run):
    # recompute_ln is only for the unembed: for layer < n_layers, ln1's cached scale of `layer`.
    _, _, cache, _, _ = run
    stack = cache.accumulated_resid(layer=2, incl_mid=True, apply_ln=True)
    assert_close(stack[1], cache["resid_mid", 0] / cache["scale", 2, "ln1"])
    stack = cache.accumulated_resid(layer=2, mlp_input=True, apply_ln=True)
    assert_close(stack[-1], cache["resid_mid", 2] / cache["scale", 2, "ln2"])


def test_decompose_resid_apply_ln_uses_one_cached_scale(model, run):
    # ActivationCache.decompose_resid(apply_ln=True) -> apply_ln_to_stack without recompute:
    # one scale, so the components still sum to ln_final's normalized input.
    _, _, cache, _, _ = run
    stack, labels = cache.decompose_resid(apply_ln=True, return_labels=True)
    assert labels[0] == "embed" and labels[-1] == f"{model.cfg.n_layers - 1}_mlp_out"
    assert_close(stack.sum(0), cache["normalized"])
    assert_close(stack[0], cache["hook_embed"] / cache["scale"])


def test_apply_ln_to_stack_recompute_ln(model, run):
    # apply_ln_to_stack(recompute_ln=True) at the final layer: model.ln_final per component.
    _, _, cache, _, _ = run
    stack = cache.decompose_resid()
    assert_close(cache.apply_ln_to_stack(stack, recompute_ln=True), model.ln_final(stack))
    assert_close(cache.apply_ln_to_stack(stack, layer=1, recompute_ln=True),
                 stack / cache["scale", 1, "ln1"])  # recompute only applies to the unembed


def test_get_full_resid_decomposition_sums_to_the_residual(model, run):
    # ActivationCache.get_full_resid_decomposition: heads, neurons, embed, bias in that order.
    _, _, cache, _, ref_cache = run
    c = model.cfg
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert len(labels) == stack.shape[0] == c.n_layers * c.n_heads + c.n_layers * c.d_mlp + 2
    assert labels[0] == "L0H0" and labels[c.n_layers * c.n_heads] == "L0N0"
    assert labels[-2:] == ["embed", "bias"]
    assert_close(stack.sum(0), ref_cache[f"blocks.{c.n_layers - 1}.hook_resid_post"], atol=2e-4)
    # Into block 2's MLP: block 2's heads are included; MLPs unexpanded.
    stack, labels = cache.get_full_resid_decomposition(layer=2, mlp_input=True, expand_neurons=False,
                                                       return_labels=True)
    assert labels == model.all_head_labels()[:3 * c.n_heads] + ["0_mlp_out", "1_mlp_out", "embed", "bias"]
    assert_close(stack.sum(0), ref_cache["blocks.2.hook_resid_mid"])


def test_get_full_resid_decomposition_apply_ln_and_projection(model, run):
    _, logits, cache, _, _ = run
    token = 17
    stack = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False)
    assert_close(stack.sum(0), cache["normalized"])
    projected = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False,
                                                   project_output_onto=model.W_U[:, token])
    assert projected.shape == stack.shape[:-1]
    assert_close(projected.sum(0), logits[..., token])


def test_tl_activation_cache_acceptance_tests_on_llama(model, run):
    # tests/acceptance/test_activation_cache.py (at 4cd36aa): test_accumulated_resid_with_apply_ln,
    # test_apply_ln_recompute_ln_differs_from_cached, test_get_full_resid_decomposition and
    # ..._project_output_onto_2d, on the Llama demo model (no pos_embed).
    _, _, cache, _, _ = run
    c = model.cfg
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    recomputed = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1, recompute_ln=True)
    scaled, labels = cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=utils.Slice(-1),
                                             apply_ln=True, return_labels=True)
    assert_close(scaled, recomputed, atol=1e-6)
    assert labels == [x for l in range(c.n_layers) for x in (f"{l}_pre", f"{l}_mid")] + ["final_post"]
    cached = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1, recompute_ln=False)
    assert cached.shape == recomputed.shape and not torch.allclose(cached, recomputed, atol=1e-7)

    heads, head_labels = cache.stack_head_results(layer=c.n_layers, pos_slice=utils.Slice(-1),
                                                  apply_ln=True, return_labels=True)
    mlps, mlp_labels = cache.decompose_resid(layer=c.n_layers, pos_slice=utils.Slice(-1), incl_embeds=False,
                                             mode="mlp", apply_ln=True, return_labels=True)
    full, full_labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, apply_ln=True,
                                                           expand_neurons=False, return_labels=True)
    n_h, n_m = heads.shape[0], mlps.shape[0]
    assert_close(full[:n_h], heads, atol=1e-6)
    assert full_labels[:n_h] == head_labels
    assert_close(full[n_h:n_h + n_m], mlps, atol=1e-6)
    assert full_labels[n_h:n_h + n_m] == mlp_labels
    assert_close(full[n_h + n_m], cache.apply_ln_to_stack(cache["embed"][None, :, -1], pos_slice=utils.Slice(-1))[0],
                 atol=1e-6)
    assert full_labels[n_h + n_m:] == ["embed", "bias"]
    directions = torch.randn(c.d_model, 2, generator=torch.Generator().manual_seed(0))
    projected = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, project_output_onto=directions)
    unprojected = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1)
    assert projected.shape == (*unprojected.shape[:-1], 2)
    assert_close(projected, unprojected @ directions)


# ------------------------------------------------------------------ patching (item 4)

@pytest.fixture
def patch_setup(model):
    # Token ids directly: one token differs (the demo tokenizer splits names unevenly).
    clean = torch.tensor([[model.cfg.bos_token_id, 40, 41, 42, 43, 44, 45, 46]])
    corrupt = clean.clone()
    corrupt[0, 3] = 90
    _, clean_cache = model.run_with_cache(clean)
    answer, wrong = 42, 90  # any two tokens: the metric only has to move

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]
    return clean, corrupt, clean_cache, metric


def _python_sweep(model, corrupt, clean_cache, metric, act, axes, setter):
    """The same sweep written with plain Python hooks (TransformerLens's own mechanism)."""
    return patching.generic_activation_patch(model, corrupt, clean_cache, metric,
                                             patch_setter=lambda a, i, c: setter(a, i, c),
                                             activation_name=act, index_axis_names=axes)


def test_get_act_patch_resid_pre(model, reference, patch_setup):
    # patching.get_act_patch_resid_pre: [n_layers, pos].
    clean, corrupt, clean_cache, metric = patch_setup
    out = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert out.shape == (model.cfg.n_layers, corrupt.shape[1])
    def setter(act, index, clean_act):
        act[:, index[1]] = clean_act[:, index[1]]
        return act
    expected = _python_sweep(model, corrupt, clean_cache, metric, "resid_pre", ("layer", "pos"), setter)
    assert_close(out, expected)
    assert out.std() > 0  # the sweep found something
    # One entry against the independent reference.
    layer, pos = 1, 5
    ref_logits, _ = reference.forward(corrupt, ops=[{
        "hook": f"blocks.{layer}.hook_resid_pre", "op": "set", "positions": [pos], "tensor": "clean"}],
        hook_tensors={"clean": clean_cache["resid_pre", layer][:, pos:pos + 1]})
    assert abs(out[layer, pos].item() - metric(ref_logits).item()) < 1e-3
    full = patching.generic_activation_patch(
        model, corrupt, clean_cache, metric, patching.layer_pos_patch_setter, "resid_pre",
        index_df=[(0, p) for p in range(corrupt.shape[1])])
    assert full.shape == (corrupt.shape[1],)
    assert_close(full, out[0])
    # Only the position where the prompts differ moves the metric at layer 0.
    differ = (clean[0] != corrupt[0]).nonzero().flatten().tolist()
    unpatched = metric(model(corrupt)).item()
    for p in range(corrupt.shape[1]):
        if p not in differ:
            assert abs(out[0, p].item() - unpatched) < 1e-4, p


def test_get_act_patch_attn_head_out_all_pos(model, patch_setup):
    # patching.get_act_patch_attn_head_out_all_pos: hook_z per head, every position: [n_layers, n_heads].
    clean, corrupt, clean_cache, metric = patch_setup
    out = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric)
    assert out.shape == (model.cfg.n_layers, model.cfg.n_heads)

    def setter(act, index, clean_act):
        act[:, :, index[1]] = clean_act[:, :, index[1]]
        return act
    expected = _python_sweep(model, corrupt, clean_cache, metric, "z", ("layer", "head"), setter)
    assert_close(out, expected)


def test_patches_per_forward_batches_a_sweep(model, patch_setup):
    # remotelens extension: k patches per forward give the same values as one per forward.
    clean, corrupt, clean_cache, metric = patch_setup
    one = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    batched = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric, patches_per_forward=3)
    assert_close(batched, one)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric)
    assert_close(patching.get_act_patch_attn_head_out_all_pos(
        model, corrupt, clean_cache, metric, patches_per_forward=8), heads)
    flat = patching.generic_activation_patch(model, corrupt, clean_cache, metric,
                                             patching.layer_pos_patch_setter, "resid_pre",
                                             index_df=[(2, 1), (0, 5), (0, 3)], patches_per_forward=2)
    assert_close(flat, torch.stack([one[2, 1], one[0, 5], one[0, 3]]))
    with pytest.raises(ValueError, match="patches_per_forward"):
        patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric, patches_per_forward=0)


def test_get_act_patch_block_every(model, patch_setup):
    # patching.get_act_patch_block_every: [3, n_layers, pos] = resid_pre, attn_out, mlp_out.
    clean, corrupt, clean_cache, metric = patch_setup
    out = patching.get_act_patch_block_every(model, corrupt, clean_cache, metric)
    assert out.shape == (3, model.cfg.n_layers, corrupt.shape[1])
    assert_close(out[0], patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric))
    mlp = _python_sweep(model, corrupt, clean_cache, metric, "mlp_out", ("layer", "pos"),
                        lambda a, i, c: (a.__setitem__((slice(None), i[1]), c[:, i[1]]), a)[1])
    assert_close(out[2], mlp)


def test_get_act_patch_attn_head_every(model, patch_setup):
    # tests/unit/test_patching.py: get_act_patch_attn_head_all_pos_every is [5, n_layers, n_heads],
    # finite, not constant; k/v (GQA) are zero-padded to n_heads (patching.py).
    clean, corrupt, clean_cache, metric = patch_setup
    c = model.cfg
    every = patching.get_act_patch_attn_head_all_pos_every(model, corrupt, clean_cache, metric,
                                                           patches_per_forward=8)
    assert every.shape == (5, c.n_layers, c.n_heads)
    assert torch.isfinite(every).all() and not torch.all(every == every[0, 0, 0])
    assert torch.all(every[2:4, :, c.n_key_value_heads:] == 0)
    assert_close(every[0], patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric))
    by_pos = patching.get_act_patch_attn_head_by_pos_every(model, corrupt, clean_cache, metric,
                                                          patches_per_forward=16)
    assert by_pos.shape == (5, c.n_layers, corrupt.shape[1], c.n_heads)
    pattern = patching.get_act_patch_attn_head_pattern_by_pos(model, corrupt, clean_cache, metric)
    assert pattern.shape == (c.n_layers, c.n_heads, corrupt.shape[1])
    assert_close(by_pos[4], pattern.transpose(1, 2))


def test_generic_activation_patch_index_df_and_kv_heads(model, patch_setup):
    # generic_activation_patch: index_df gives flat output; return_index_df returns the indices;
    # k/v sweeps range over the key/value heads.
    clean, corrupt, clean_cache, metric = patch_setup
    out, index_df = patching.get_act_patch_attn_head_v_all_pos(model, corrupt, clean_cache, metric,
                                                               return_index_df=True)
    assert out.shape == (model.cfg.n_layers, model.cfg.n_key_value_heads)
    rows = [tuple(r) for r in (index_df.values.tolist() if hasattr(index_df, "values") else index_df)]
    assert rows[:2] == [(0, 0), (0, 1)] and len(rows) == out.numel()
    flat = patching.generic_activation_patch(model, corrupt, clean_cache, metric,
                                             patching.layer_head_vector_patch_setter, "v",
                                             index_df=[(2, 1), (0, 0)])
    assert_close(flat, torch.stack([out[2, 1], out[0, 0]]))
    stored = model.run_with_cache(clean, store=True)[1]  # patched by handle on the server
    again = patching.get_act_patch_attn_head_v_all_pos(model, corrupt, stored, metric)
    assert_close(again, out)
    stored.delete()


# ------------------------------------------------------------------ left padding (item 6)

def test_left_padding_real_positions_unchanged(model, reference):
    # TL (components/abstract_attention.py) masks pad keys; a pad query then has only -inf
    # scores and TL zeroes its NaN pattern. remotelens lets a pad query attend to itself
    # (docs/decisions.md "Padding rows stay finite"); real positions are identical either way.
    rows = [[507, 5, 6, 7, 8, 9], [507, 9, 10, 11]]
    tokens, mask = left_pad(rows)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    _, ref_cache = reference.forward(tokens, attention_mask=mask)
    _, alone = model.run_with_cache(torch.tensor([rows[1]]))
    real = mask.bool()
    for name in ["hook_embed", "blocks.1.hook_resid_post", "blocks.2.attn.hook_z",
                 "blocks.3.hook_resid_post", "ln_final.hook_normalized"]:
        assert_close(cache[name][real], ref_cache[name][real], what=name)
        assert_close(cache[name][1, 2:], alone[name][0], what=f"{name} padded vs alone")
    pattern = cache["pattern", 0]  # [batch, head, query, key]
    assert_close(pattern[1][:, 2:, 2:], alone["pattern", 0][0])
    assert torch.all(pattern[1][:, 2:, :2] == 0)  # real queries never see pads
    # The documented departure: each pad query attends only to itself.
    assert torch.equal(pattern[1][:, :2, :2], torch.eye(2).expand(model.cfg.n_heads, 2, 2))
