"""The engine's tokenizer against Hugging Face's tokenizers.js on the same tokenizer.json.

tokenizers.js is Hugging Face's own JavaScript port of `tokenizers` (no shared code with the
engine's C++ tokenizer). The demo tokenizer.json has Llama 3's exact structure: the Llama 3 split
regex (Isolated), ByteLevel without its own regex, BPE with ignore_merges, ByteLevel decoder,
special added tokens. Both tokenizers encode the same texts (no BOS) and must give the same ids;
decoding must give back the text. The texts cover what pre-tokenization gets wrong first:
contractions in any case, digit runs, whitespace runs and newlines, non-Latin scripts, emoji,
combining marks, punctuation runs, code and special-token text.

Setup: `npm ci --prefix tests/tokenizer_js` (scripts/test.sh does it).
"""
import json
import os

import pytest

import server_harness
from remotelens._wire import tensor_from_proto
from remotelens.v1 import remotelens_pb2 as pb

TEXTS = [
    "Hello world",
    "Hello, world! How's it going?",
    "I'm here; you're there; they'll come; we've won; he'd go; it's; don't",
    "I'M LOUD; YOU'RE; THEY'LL; It'S; o'clock; ''quoted''; rock 'n' roll",
    "1 12 123 1234 12345 1234567 3.14159 1,000,000 2024-11-22 0x1F",
    "  leading spaces",
    "trailing spaces   ",
    "          ten spaces",
    "tabs\tand\nnewlines\r\nand\rreturns",
    "multiple\n\n\nnewlines\n \n\t\n",
    "café naïve Straße façade",
    "中文字符 日本語のテキスト 한국어 مرحبا שלום Ελληνικά русский",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 and nbsp\u00a0here and zero\u200bwidth",
    "...!!!??? --- *** ((()))",
    "(a+b)*c <html><body>foo_bar-baz</body></html> @user #tag $100 50% ~/path/to",
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))\n",
    "<|begin_of_text|>Hello<|end_of_text|>",
    "text<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa the the the then there their",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
]


@pytest.fixture(scope="module", params=["demo", "vocab4096"])
def served(request, demo_server, demo_model_dir, tmp_path_factory):
    """(tokenizer.json path, stub) for the demo tokenizer and for a larger one (more merges)."""
    if request.param == "demo":
        yield os.path.join(demo_model_dir, "tokenizer.json"), demo_server.stub()
        return
    model = server_harness.make_demo_model(str(tmp_path_factory.mktemp("vocab4096")),
                                           "--vocab_size", "4096", "--n_layers", "1")
    with server_harness.ServerProcess(model) as server:
        yield os.path.join(model, "tokenizer.json"), server.stub()


def _engine_ids(stub, texts):
    # One text per call: rows of a batch would be padded to a common length.
    rows = []
    for text in texts:
        r = stub.Tokenize(pb.TokenizeRequest(texts=[text], prepend_bos=False))
        rows.append(tensor_from_proto(r.tokens)[0].tolist())
    return rows


def test_token_ids_match_hugging_face(served, tokenizers_js):
    tokenizer_json, stub = served
    with open(tokenizer_json) as f:
        assert len(json.load(f)["model"]["merges"]) > 200, "too few merges to exercise BPE"
    expected = tokenizers_js(tokenizer_json, TEXTS)
    got = _engine_ids(stub, TEXTS)
    mismatches = [(text, g, e["ids"]) for text, g, e in zip(TEXTS, got, expected) if g != e["ids"]]
    assert not mismatches, "\n".join(f"{t!r}:\n  engine {g}\n  hf     {e}" for t, g, e in mismatches)


def test_decoding_matches_hugging_face(served, tokenizers_js):
    tokenizer_json, stub = served
    expected = tokenizers_js(tokenizer_json, TEXTS)
    rows = [pb.TokenRow(ids=e["ids"]) for e in expected]
    decoded = stub.Detokenize(pb.DetokenizeRequest(rows=rows)).texts
    for text, ours, theirs in zip(TEXTS, decoded, expected):
        assert theirs["decoded"] == text  # the reference itself round-trips
        assert ours == text.encode(), (text, ours)
