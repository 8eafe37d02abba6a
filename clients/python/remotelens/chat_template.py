"""Chat templates rendered in this process, as Hugging Face's apply_chat_template renders them.

The server sends the model directory's templates and special-token texts in ModelInfo
(tokenizer_config.json's chat_template, or chat_template.jinja); this module renders them with
jinja2 under the conventions transformers uses, so a template written for transformers gives the
same text here:
  - a sandboxed environment with trim_blocks and lstrip_blocks, and the loop-controls extension
    ({% break %}, {% continue %});
  - `tojson` as json.dumps with ensure_ascii=False (jinja2's own escapes HTML characters);
  - globals raise_exception(message) (a jinja2 TemplateError) and strftime_now(format) (the
    local time, for templates that print today's date, as Llama 3.1 Instruct's does);
  - a {% generation %} ... {% endgeneration %} block renders its body (transformers uses it to
    mark assistant tokens);
  - the variables messages, tools, documents, add_generation_prompt, bos_token, eos_token and any
    extra keyword arguments (date_string=..., ...).

jinja2 is imported on first use: only apply_chat_template needs it.
"""

import datetime
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["ChatTemplateError", "render_chat_template", "select_template"]

# strftime_now's clock; tests replace it to pin the date.
_now: Callable[[], datetime.datetime] = datetime.datetime.now

_ENVIRONMENT = None


class ChatTemplateError(ValueError):
    """No usable template, or a template that refused the conversation (raise_exception)."""


def _environment():
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    try:
        import jinja2
        from jinja2 import ext, sandbox
    except ImportError as e:  # pragma: no cover - jinja2 is a declared dependency
        raise ImportError("apply_chat_template needs jinja2 (Debian: apt-get install "
                          "python3-jinja2; pip: pip install jinja2)") from e

    class GenerationBlock(ext.Extension):
        """{% generation %}body{% endgeneration %}: renders the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return _now().strftime(fmt)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _ENVIRONMENT = env
    return env


def select_template(templates: Mapping[str, str], chat_template: Optional[str],
                    tools: Optional[Sequence[Any]]) -> str:
    """The Jinja source to render: Hugging Face's choice among a checkpoint's templates.

    Args:
        templates: name -> source, as the server sent them (may be empty).
        chat_template: a template name from `templates`, or a Jinja source; None: the default
            (the "tool_use" template instead when `tools` are given and there is one).
        tools: the tools passed to apply_chat_template.

    Returns:
        The template source.
    """
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ChatTemplateError(
            f"this model has chat templates named {sorted(templates)} but none is \"default\": "
            f"pass chat_template=<one of those names>")
    raise ChatTemplateError(
        "this model has no chat template (its model directory has neither a chat_template in "
        "tokenizer_config.json nor chat_template.jinja, as base checkpoints do): pass "
        "chat_template=<Jinja source>, or serve the Instruct checkpoint's directory")


def render_chat_template(source: str, conversation: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False,
                         continue_final_message: bool = False,
                         tools: Optional[Sequence[Mapping[str, Any]]] = None,
                         documents: Optional[Sequence[Mapping[str, str]]] = None,
                         special_tokens: Optional[Mapping[str, str]] = None,
                         **kwargs: Any) -> str:
    """One conversation -> the template's text.

    Args:
        source: the Jinja template.
        conversation: messages, each a mapping with "role" and "content" (and whatever else the
            template reads, e.g. "tool_calls").
        add_generation_prompt: end with the header that starts an assistant turn.
        continue_final_message: end the text right after the last message's content, so that
            generation continues that message (exclusive with add_generation_prompt).
        tools: JSON-schema tool descriptions (dicts), passed to the template as `tools`.
        documents: documents for retrieval templates, each a dict (e.g. "title", "text").
        special_tokens: bos_token, eos_token, ... texts the template may refer to.
        **kwargs: further template variables (e.g. date_string).

    Returns:
        The rendered text.
    """
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be set: "
                         "the first starts a new assistant turn, the second continues the last one")
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools must be JSON-schema dicts; got {type(tool).__name__} (this "
                            f"client does not derive schemas from Python functions)")
    messages: List[Dict[str, Any]] = [dict(m) for m in conversation]
    for i, m in enumerate(messages):
        if "role" not in m:
            raise ValueError(f"message {i} has no \"role\": each message is a dict such as "
                             f"{{\"role\": \"user\", \"content\": \"...\"}}")
    env = _environment()
    import jinja2  # present: _environment() imported it

    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): "
                                f"{e.message}") from e
    try:
        rendered = template.render(
            messages=messages, tools=list(tools) if tools is not None else None,
            documents=list(documents) if documents is not None else None,
            add_generation_prompt=add_generation_prompt, **dict(special_tokens or {}), **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, messages)
    return rendered


def _cut_after_final_message(rendered: str, messages: Sequence[Mapping[str, Any]]) -> str:
    if not messages:
        raise ValueError("continue_final_message needs at least one message")
    content = messages[-1].get("content")
    if isinstance(content, list):  # multimodal content: the text parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("continue_final_message needs a final message with text content")
    # Templates often strip the content; the stripped form is what appears in the text.
    for candidate in (content, content.strip()):
        at = rendered.rfind(candidate)
        if at >= 0:
            return rendered[:at + len(candidate)]
    raise ChatTemplateError("continue_final_message: the final message's content does not appear "
                            "in the rendered text, so the template changes it and the text cannot "
                            "be cut after it")
