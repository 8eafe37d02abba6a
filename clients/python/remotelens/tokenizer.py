"""A small Hugging Face-shaped tokenizer that tokenizes on the server.

model.tokenizer supports what TransformerLens notebooks usually touch: padding_side,
bos/eos/pad token ids and strings, encode, decode, batch_decode, __call__ returning
input_ids and attention_mask, and apply_chat_template / chat_template for Instruct checkpoints
(the template comes from the server, rendered here: remotelens.chat_template).
"""

from typing import (TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch

from . import chat_template as chat_template_module
from ._wire import tensor_from_proto
from .v1 import remotelens_pb2 as pb

if TYPE_CHECKING:  # pragma: no cover
    from .hooked_transformer import HookedTransformer

__all__ = ["RemoteTokenizer"]

_SIDES = {"left": pb.PADDING_SIDE_LEFT, "right": pb.PADDING_SIDE_RIGHT}


def decode_bytes(data: bytes) -> str:
    """Token bytes -> text; a multi-byte character cut between tokens becomes U+FFFD."""
    return data.decode("utf-8", errors="replace")


class RemoteTokenizer:
    """Tokenizer of the remote model.

    Attributes:
        padding_side: "right" (TransformerLens's default) or "left"; used by to_tokens.
        model_max_length: the model's n_ctx.
    """

    # Texts per Tokenize request; the server's default max_batch.
    BATCH = 64

    def __init__(self, model: "HookedTransformer", info: Optional[pb.ModelInfo] = None):
        self._model = model
        # The model directory's chat templates (name -> Jinja source) and the special-token
        # texts they refer to, as the server read them from tokenizer_config.json.
        self._chat_templates: Dict[str, str] = {
            t.name: t.source for t in (info.chat_templates if info is not None else ())}
        self._template_tokens = {"bos_token": info.bos_token if info is not None else "",
                                 "eos_token": info.eos_token if info is not None else ""}
        self.padding_side = "right"
        self.model_max_length = model.cfg.n_ctx
        self.name_or_path = model.cfg.model_name
        self.bos_token_id = model.cfg.bos_token_id
        eos = model.cfg.eos_token_ids
        self.eos_token_id = eos[0] if eos else None
        self._pad_token_id: Optional[int] = None
        self._token_text: Dict[int, str] = {}
        # Hugging Face's eos_token is tokenizer_config.json's: "<|eot_id|>" (128009) for Llama 3.1
        # Instruct, where config.json lists 128001 first. Generation still stops at every id in
        # cfg.eos_token_ids.
        eos_text = self._template_tokens["eos_token"]
        if eos_text:
            rows = self._tokenize([eos_text], False, "right")[0]
            if len(rows[0]) == 1:
                self.eos_token_id = rows[0][0]
                self._token_text[rows[0][0]] = eos_text

    def __repr__(self) -> str:
        return f"RemoteTokenizer(name_or_path={self.name_or_path!r}, padding_side={self.padding_side!r})"

    @property
    def vocab_size(self) -> int:
        return self._model.cfg.d_vocab

    @property
    def pad_token_id(self) -> Optional[int]:
        if self._pad_token_id is None:
            self._pad_token_id = self._tokenize(["a"], False, "right")[2]
        return self._pad_token_id

    def _special(self, token_id: Optional[int]) -> Optional[str]:
        if token_id is None:
            return None
        if token_id not in self._token_text:
            self._token_text[token_id] = self.decode([token_id])
        return self._token_text[token_id]

    @property
    def bos_token(self) -> Optional[str]:
        return self._special(self.bos_token_id)

    @property
    def eos_token(self) -> Optional[str]:
        return self._special(self.eos_token_id)

    @property
    def pad_token(self) -> Optional[str]:
        return self._special(self.pad_token_id)

    @property
    def chat_template(self) -> Union[None, str, Dict[str, str]]:
        """The checkpoint's chat template: its Jinja source, a dict name -> source when it has
        several, or None (Hugging Face's tokenizer.chat_template)."""
        if not self._chat_templates:
            return None
        if list(self._chat_templates) == ["default"]:
            return self._chat_templates["default"]
        return dict(self._chat_templates)

    def apply_chat_template(self, conversation, tools: Optional[Sequence[Mapping[str, Any]]] = None,
                            documents: Optional[Sequence[Mapping[str, str]]] = None,
                            chat_template: Optional[str] = None,
                            add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            padding: bool = False, truncation: bool = False,
                            max_length: Optional[int] = None,
                            return_tensors: Optional[str] = None, return_dict: bool = False,
                            **kwargs: Any):
        """Formats a conversation with the model's chat template (Hugging Face semantics).

        Args:
            conversation: a list of {"role": ..., "content": ...} messages, or a list of such
                lists (a batch).
            tools: JSON-schema tool descriptions for templates that take tools.
            documents: documents for retrieval templates.
            chat_template: a template name (when the checkpoint has several) or a Jinja source;
                default: the checkpoint's template ("tool_use" when tools are given and it has
                one).
            add_generation_prompt: end with the header of a new assistant turn.
            continue_final_message: end right after the last message's text, so generation
                continues it.
            tokenize: return token ids (encoded on the server without adding BOS: the template
                writes it) instead of text.
            padding: with a batch and return_tensors="pt", rows are padded (always done for
                tensors; lists are returned unpadded).
            truncation, max_length: keep at most max_length tokens per row.
            return_tensors: "pt" for an int64 tensor [batch, pos]; None for lists.
            return_dict: return {"input_ids": ..., "attention_mask": ...} (with tokenize).
            **kwargs: extra template variables, e.g. date_string="26 Jul 2024".

        Returns:
            The text (or texts), token ids, a tensor, or a dict, as Hugging Face returns them.
        """
        batched = (isinstance(conversation, (list, tuple)) and len(conversation) > 0
                   and isinstance(conversation[0], (list, tuple)))
        conversations = list(conversation) if batched else [conversation]
        source = chat_template_module.select_template(self._chat_templates, chat_template, tools)
        special = {name: text for name, text in self._template_tokens.items() if text}
        special.setdefault("bos_token", self.bos_token or "")
        special.setdefault("eos_token", self.eos_token or "")
        texts = [chat_template_module.render_chat_template(
            source, c, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            special_tokens=special, **kwargs) for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        limit = max_length if truncation else None
        if return_tensors == "pt":
            input_ids, attention_mask = self.encode_batch(texts, prepend_bos=False, max_length=limit)
        else:
            rows = self._tokenize(texts, False, "right")[0]
            rows = [r[:limit] if limit is not None else r for r in rows]
            input_ids = rows if batched else rows[0]
            attention_mask = ([[1] * len(r) for r in rows] if batched else [1] * len(rows[0]))
        if return_dict:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return input_ids

    def special_token_ids(self) -> List[int]:
        """bos, eos (all of the model's) and pad ids: what skip_special_tokens removes."""
        ids = [self.bos_token_id, self.pad_token_id, *self._model.cfg.eos_token_ids]
        return sorted({i for i in ids if i is not None})

    # ------------------------------------------------------------------ encoding

    def _tokenize(self, texts: Sequence[str], prepend_bos: bool, side: str,
                  str_tokens: bool = False) -> Tuple[List[List[int]], List[List[bytes]], int]:
        """Token ids (and token bytes) of each text, unpadded, plus the server's pad id."""
        rows: List[List[int]] = []
        pieces: List[List[bytes]] = []
        pad_id = 0
        for start in range(0, len(texts), self.BATCH):
            batch = list(texts[start:start + self.BATCH])
            response = self._model._unary("Tokenize", pb.TokenizeRequest(
                texts=batch, prepend_bos=prepend_bos, padding_side=pb.PADDING_SIDE_RIGHT,
                return_str_tokens=str_tokens))
            pad_id = int(response.pad_token_id)
            table = tensor_from_proto(response.tokens)  # [texts, pos], right-padded
            for r, n in enumerate(response.lengths):
                rows.append(table[r, :int(n)].tolist())
            if str_tokens:
                pieces.extend(list(s.tokens) for s in response.str_tokens)
        if self._pad_token_id is None:
            self._pad_token_id = pad_id
        return rows, pieces, pad_id

    def encode_batch(self, texts: Sequence[str], prepend_bos: bool = True,
                     padding_side: Optional[str] = None,
                     max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (tokens [batch, pos] int64, attention_mask [batch, pos] int64), padded.

        Args:
            texts: the texts.
            prepend_bos: start each row with the BOS token.
            padding_side: "left" or "right"; default self.padding_side.
            max_length: truncate longer rows to this many tokens (keeping the start).
        """
        side = padding_side or self.padding_side
        if side not in _SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows, _, pad_id = self._tokenize(texts, prepend_bos, side)
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        return pad_rows(rows, pad_id, side)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """One text -> its token ids (BOS first when add_special_tokens)."""
        return self._tokenize([text], add_special_tokens, "right")[0][0]

    def __call__(self, text: Union[str, List[str]], return_tensors: Optional[str] = "pt",
                 padding: bool = True, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: Optional[int] = None):
        """HF-style call: {"input_ids": ..., "attention_mask": ...} as tensors (or lists)."""
        texts = [text] if isinstance(text, str) else list(text)
        tokens, mask = self.encode_batch(texts, add_special_tokens,
                                         max_length=max_length if truncation else None)
        if return_tensors == "pt":
            return {"input_ids": tokens, "attention_mask": mask}
        ids = [row[m.bool()].tolist() for row, m in zip(tokens, mask)]
        return {"input_ids": ids[0] if isinstance(text, str) else ids,
                "attention_mask": [[1] * len(r) for r in ids]}

    # ------------------------------------------------------------------ decoding

    def _detokenize(self, rows: Sequence[Sequence[int]], str_tokens: bool = False):
        texts: List[bytes] = []
        pieces: List[List[bytes]] = []
        for start in range(0, len(rows), self.BATCH):
            response = self._model._unary("Detokenize", pb.DetokenizeRequest(
                rows=[pb.TokenRow(ids=[int(i) for i in r]) for r in rows[start:start + self.BATCH]],
                return_str_tokens=str_tokens))
            texts.extend(response.texts)
            pieces.extend(list(s.tokens) for s in response.str_tokens)
        return texts, pieces

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text."""
        ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        if skip_special_tokens:
            special = set(self.special_token_ids())
            ids = [i for i in ids if i not in special]
        return decode_bytes(self._detokenize([ids])[0][0])

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> List[str]:
        """Rows of token ids -> texts."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else [list(r) for r in rows]
        if skip_special_tokens:
            special = set(self.special_token_ids())
            rows = [[i for i in r if i not in special] for r in rows]
        return [decode_bytes(t) for t in self._detokenize(rows)[0]]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        """Each id's own text."""
        return [decode_bytes(b) for b in self._detokenize([list(ids)], str_tokens=True)[1][0]]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pads token rows to a common length: (tokens [batch, pos], attention_mask [batch, pos])."""
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        if not row:
            continue
        start = width - len(row) if side == "left" else 0
        tokens[i, start:start + len(row)] = torch.tensor(list(row), dtype=torch.int64)
        mask[i, start:start + len(row)] = 1
    return tokens, mask
