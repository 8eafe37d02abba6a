"""Tokenizer methods of HookedTransformer (to_tokens, to_string, to_str_tokens, ...).

Tokenization runs on the server (Tokenize / Detokenize), through model.tokenizer.
"""

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .tokenizer import decode_bytes


class TokensMixin:
    """Needs self.cfg, self.tokenizer and self._to_device()."""

    def _resolve_prepend_bos(self, prepend_bos: Optional[bool]) -> bool:
        return self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)

    def _encode(self, texts: Sequence[str], prepend_bos: Optional[bool] = None,
                padding_side: Optional[str] = None, truncate: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.encode_batch(list(texts), self._resolve_prepend_bos(prepend_bos),
                                           padding_side, self.cfg.n_ctx if truncate else None)

    def to_tokens(self, input: Union[str, List[str]], prepend_bos: Optional[bool] = None,
                  padding_side: Optional[str] = None, move_to_device: bool = True,
                  truncate: bool = True) -> torch.Tensor:
        """Text(s) -> int64 tokens [batch, pos], padded on padding_side (default tokenizer's).

        Args:
            input: a text or a list of texts.
            prepend_bos: start with BOS (default cfg.default_prepend_bos, True).
            padding_side: "left" or "right" (default model.tokenizer.padding_side, "right").
            move_to_device: put the tokens on cfg.device.
            truncate: cut rows longer than n_ctx.
        """
        tokens, _ = self._encode([input] if isinstance(input, str) else list(input),
                                 prepend_bos, padding_side, truncate)
        return self._to_device(tokens) if move_to_device else tokens

    def to_string(self, tokens) -> Union[str, List[str]]:
        """Tokens -> text: [pos] or a list of ids gives a str, [batch, pos] a list of str."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(tokens)
        if tokens.dim() == 2:
            return self.tokenizer.batch_decode(tokens)
        if tokens.dim() <= 1:
            return self.tokenizer.decode(tokens.reshape(-1))
        raise ValueError(f"Invalid shape passed in: {tuple(tokens.shape)}")

    def to_str_tokens(self, input, prepend_bos: Optional[bool] = None,
                      padding_side: Optional[str] = None) -> Union[List[str], List[List[str]]]:
        """Each token's text, for a text, tokens [pos] or [1, pos], or a list of those."""
        if isinstance(input, list):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            _, pieces, _ = self.tokenizer._tokenize([input], self._resolve_prepend_bos(prepend_bos),
                                                    "right", str_tokens=True)
            return [decode_bytes(p) for p in pieces[0][:self.cfg.n_ctx]]
        if isinstance(input, (torch.Tensor, np.ndarray)):
            ids = torch.as_tensor(input).squeeze()
            if ids.dim() == 0:
                ids = ids[None]
            if ids.dim() != 1:
                raise ValueError(f"Invalid tokens input to to_str_tokens, has shape: "
                                 f"{tuple(ids.shape)}")
            return self.tokenizer.convert_ids_to_tokens(ids.tolist())
        raise ValueError(f"Invalid input type to to_str_tokens: {type(input)}")

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (AssertionError otherwise, as in TL)."""
        tokens = self.to_tokens(string, prepend_bos=False, move_to_device=False).squeeze()
        assert not tokens.shape, f"Input string: {string} is not a single token!"
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        assert isinstance(int_token, int)
        token = self.to_str_tokens(torch.tensor([int_token]))
        assert len(token) == 1
        return token[0]

    def get_token_position(self, single_token: Union[str, int], input, mode: str = "first",
                           prepend_bos: Optional[bool] = None,
                           padding_side: Optional[str] = None) -> int:
        """Position of a token in a text or a token sequence ([pos] or [1, pos]).

        Args:
            single_token: a token id or a string that is one token.
            input: the text or tokens to search.
            mode: "first" or "last" occurrence.
        """
        tokens = (self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)
                  if isinstance(input, str) else torch.as_tensor(input))
        if tokens.dim() == 2:
            assert tokens.shape[0] == 1, (
                f"If tokens are rank two, they must have shape [1, seq_len], not {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = int(single_token.item())
        indices = torch.arange(len(tokens))[tokens.cpu() == single_token]
        assert len(indices) > 0, "The token does not occur in the prompt"
        if mode == "first":
            return int(indices[0])
        if mode == "last":
            return int(indices[-1])
        raise ValueError(f"mode must be 'first' or 'last', not {mode}")

    def _as_tokens(self, input) -> torch.Tensor:
        tokens = torch.as_tensor(input)
        if tokens.is_floating_point():
            raise TypeError("token input must be integer ids; pass float residuals with "
                            "start_at_layer")
        tokens = tokens.to(torch.int64).cpu()
        return tokens[None] if tokens.dim() == 1 else tokens

    def _infer_attention_mask(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """With left padding (tokenizer.padding_side == "left"), leading pad tokens are masked."""
        if self.tokenizer.padding_side != "left" or tokens.shape[1] == 0:
            return None
        leading_pad = torch.cumprod((tokens == self.tokenizer.pad_token_id).long(), dim=1)
        if not bool(leading_pad.any()):
            return None
        return 1 - leading_pad
