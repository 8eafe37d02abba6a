"""generate() and generate_stream() against greedy decoding with the reference."""
import pytest
import torch

from remotelens import ops
from client_helpers import reference_greedy

PROMPT = "The cat sat on"


def test_greedy_generate_matches_reference(model, reference):
    tokens = model.to_tokens(PROMPT)
    out = model.generate(tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(out, reference_greedy(reference, tokens, 8))
    text = model.generate(PROMPT, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(text, str) and text == model.to_string(out[0, 1:])


def test_generate_with_a_steering_op_matches_reference(model, reference):
    tokens = model.to_tokens(PROMPT)
    vector = torch.linspace(-2, 2, model.cfg.d_model)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ops.add(vector))]):
        steered = model.generate(tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False,
                                 verbose=False)
    expected = reference_greedy(reference, tokens, 8, hook_tensors={"v": vector},
                                ops=[{"hook": "blocks.1.hook_resid_post", "op": "add", "tensor": "v"}])
    assert torch.equal(steered, expected)
    assert not torch.equal(steered, reference_greedy(reference, tokens, 8))  # the steering mattered


def test_generate_with_a_python_hook_runs_on_the_server_through_the_kv_cache(model, reference):
    """TransformerLens's generate(use_past_kv_cache=True): the hook sees the prompt at the first
    step, then only the new position (HookedTransformer.generate feeds one token per step)."""
    tokens = model.to_tokens(PROMPT)
    expected = reference_greedy(reference, tokens, 4, ops=[{"hook": "blocks.2.attn.hook_z", "op": "zero", "heads": [1]}])
    n = tokens.shape[1]
    for use_past_kv_cache, seen in ((True, [n, 1, 1, 1]), (False, [n, n + 1, n + 2, n + 3])):
        calls = []

        def ablate(z, hook):
            calls.append(z.shape[1])
            z[:, :, 1] = 0

        with model.hooks(fwd_hooks=[("blocks.2.attn.hook_z", ablate)]):
            out = model.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False,
                                 use_past_kv_cache=use_past_kv_cache, verbose=False)
        assert torch.equal(out, expected)
        assert calls == seen, use_past_kv_cache


def test_generate_with_a_python_hook_and_sampling_equals_the_op_form(model):
    """A Python hook and the equivalent server op give the same sampled tokens for a seed."""
    tokens = model.to_tokens(PROMPT)
    vector = torch.linspace(-1, 1, model.cfg.d_model)

    def steer(resid, hook):
        return resid + vector

    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.8, seed=7, stop_at_eos=False, verbose=False)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", steer)]):
        python = model.generate(tokens, **kwargs)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ops.add(vector))]):
        server = model.generate(tokens, **kwargs)
    assert torch.equal(python, server)


def test_batched_text_generation_left_pads(model, reference):
    prompts = ["The cat sat on", "Hello"]
    out = model.generate(prompts, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                         return_type="tokens")
    for i, prompt in enumerate(prompts):
        alone = reference_greedy(reference, model.to_tokens(prompt), 5)
        assert out[i, -5:].tolist() == alone[0, -5:].tolist()
    texts = model.generate(prompts, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(texts, list) and texts[1].startswith("Hello")


def test_stop_at_eos_pads_finished_rows(model, reference):
    tokens = model.to_tokens(PROMPT)
    free = reference_greedy(reference, tokens, 6)
    eos = int(free[0, tokens.shape[1] + 1])  # pretend the second generated token ends the text
    out = model.generate(tokens, max_new_tokens=6, do_sample=False, eos_token_id=eos, verbose=False)
    assert out.shape[1] == tokens.shape[1] + 2 and out[0, -1] == eos


def test_sampling_is_reproducible_and_respects_top_k(model):
    tokens = model.to_tokens(PROMPT)
    torch.manual_seed(0)
    a = model.generate(tokens, max_new_tokens=6, stop_at_eos=False, verbose=False)
    torch.manual_seed(0)
    b = model.generate(tokens, max_new_tokens=6, stop_at_eos=False, verbose=False)
    assert torch.equal(a, b)
    greedy = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    top1 = model.generate(tokens, max_new_tokens=6, top_k=1, stop_at_eos=False, verbose=False)
    assert torch.equal(top1, greedy)
    zero_temperature = model.generate(tokens, max_new_tokens=6, temperature=0.0, stop_at_eos=False, verbose=False)
    assert torch.equal(zero_temperature, greedy)


def test_generate_stream_yields_each_step(model):
    tokens = model.to_tokens(PROMPT)
    full = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    steps = list(model.generate_stream(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False))
    assert len(steps) == 6 and all(s.shape == (1, 1) for s in steps)
    assert torch.equal(torch.cat(steps, dim=1), full[:, tokens.shape[1]:])
    chunks = list(model.generate_stream(tokens, max_new_tokens=6, max_tokens_per_yield=4,
                                        do_sample=False, stop_at_eos=False))
    assert [c.shape[1] for c in chunks] == [4, 2]
    text = "".join(model.generate_stream(PROMPT, max_new_tokens=6, do_sample=False, stop_at_eos=False))
    assert text == model.to_string(full[0, tokens.shape[1]:])


def test_generate_rejects_embeddings(model):
    with pytest.raises(NotImplementedError):
        model.generate(torch.zeros(1, 3, model.cfg.d_model), verbose=False)
