"""TransformerLens's past_kv_cache, kept on the server.

TransformerLens (transformer_lens/past_key_value_caching.py) holds the keys and values of earlier
calls in the notebook's memory. Here they stay in the model's server session, as a stored cache
referenced by a handle that this object carries and updates after every call:

    from remotelens.past_key_value_caching import HookedTransformerKeyValueCache
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=1)
    model(first_tokens, past_kv_cache=cache)        # cache now holds first_tokens' positions
    logits = model(next_tokens, past_kv_cache=cache)  # == model(cat(first, next))[:, -n:]
    cache.freeze()                                  # read, but no longer extended
    cache.free()                                    # frees it on the server

Semantics follow TransformerLens: the cache is extended in place unless frozen; logits, loss,
hooks and run_with_cache see only the new positions; the attention mask of earlier calls is
remembered (left padding in the first chunk keeps working; later chunks are all real tokens
unless an attention_mask is passed). The batch size stays the one the cache was made for.
Differences: the keys and values are not local tensors (`entries` is not available; fetch them
with `fetch()`), and a cache belongs to the one model (server session) that first used it.
"""

from typing import Dict, Optional

import torch

from .v1 import remotelens_pb2 as pb

__all__ = ["HookedTransformerKeyValueCache"]


class HookedTransformerKeyValueCache:
    """A handle to a key/value cache held in the model's server session.

    Attributes:
        batch_size: rows of every input run with this cache.
        frozen: when True, calls read the cache but do not extend it (TransformerLens freeze()).
    """

    def __init__(self, batch_size: int = 1, frozen: bool = False):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.frozen = bool(frozen)
        self._handle: Optional[str] = None
        self._length = 0
        self._model = None  # the model whose session holds the cache, once used

    @classmethod
    def init_cache(cls, cfg=None, device=None, batch_size: int = 1) -> "HookedTransformerKeyValueCache":
        """An empty cache for `batch_size` rows (TransformerLens's signature; cfg and device are
        accepted for compatibility: the server knows the model and keeps the tensors on its own
        devices)."""
        return cls(batch_size=batch_size)

    def freeze(self) -> None:
        """Later calls read the cache but do not append their positions."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Later calls append their positions again."""
        self.frozen = False

    @property
    def handle(self) -> Optional[str]:
        """The server's handle (None until a call stored something)."""
        return self._handle

    @property
    def length(self) -> int:
        """Positions cached so far (padding included)."""
        return self._length

    @property
    def session_id(self) -> Optional[str]:
        return None if self._model is None else self._model.session_id

    def __repr__(self) -> str:
        return (f"HookedTransformerKeyValueCache(batch_size={self.batch_size}, length={self._length}, "
                f"frozen={self.frozen}, handle={self._handle!r})")

    # ------------------------------------------------------------------ used by the model

    def _request(self, model, batch: int) -> pb.PastKvCache:
        """The PastKvCache message for a call of `batch` rows on `model`."""
        if self._model is not None and self._model is not model:
            raise ValueError("this past_kv_cache belongs to another model (its keys and values are "
                             "in that model's server session)")
        if batch != self.batch_size:
            raise ValueError(f"input has {batch} rows; this past_kv_cache was made for batch_size="
                             f"{self.batch_size}")
        return pb.PastKvCache(handle=self._handle or "", frozen=self.frozen)

    def _update(self, model, summary: pb.RunResponse.Summary) -> None:
        """Takes the handle and length the server reported after a call."""
        self._model = model
        if summary.kv_cache_handle:
            self._handle = summary.kv_cache_handle
        self._length = int(summary.kv_cache_length)

    # ------------------------------------------------------------------ server side

    def fetch(self) -> Dict[str, torch.Tensor]:
        """The cached tensors: "kv.mask" int64 [batch, length], and per block L "kv.{L}.keys" and
        "kv.{L}.values" [batch, n_kv_heads, length, d_head] (keys after rotary). Empty before the
        first stored call."""
        if self._handle is None:
            return {}
        return self._model._fetch_cache(self._model.session_id, self._handle, [], None)

    @property
    def previous_attention_mask(self) -> torch.Tensor:
        """int64 [batch, length]: 1 for real tokens, 0 for padding, over the cached positions."""
        if self._handle is None:
            return torch.zeros((self.batch_size, 0), dtype=torch.int64)
        return self._model._fetch_cache(self._model.session_id, self._handle, ["kv.mask"], None)["kv.mask"]

    def free(self) -> int:
        """Frees the cache on the server; returns the bytes freed. The object is empty afterwards
        (the next call starts a new cache)."""
        freed = 0
        if self._handle is not None:
            freed = self._model._delete_cache(self._model.session_id, self._handle)
        self._handle = None
        self._length = 0
        return freed
