"""The remote model's configuration, shaped like TransformerLens's HookedTransformerConfig."""

import dataclasses
from typing import List, Optional

import torch

from ._wire import dtype_from_proto
from .v1 import remotelens_pb2

__all__ = ["HookedTransformerConfig"]


@dataclasses.dataclass
class HookedTransformerConfig:
    """What the server reports about its model, under TransformerLens's field names.

    Fields that only make sense for other architectures keep TransformerLens's values for a
    Llama model (normalization_type "RMSPre" when LN weights are folded into the weights, else
    "RMS"; positional_embedding_type "rotary"; gated_mlp True; act_fn "silu").

    `device` is where this client puts the tensors it returns ("cpu" unless model.to() changed
    it); `server_devices` is where the server runs the model ("cpu", "cuda:0", ...).
    """

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    eps: float
    rotary_base: float
    dtype: torch.dtype
    device: str = "cpu"
    server_devices: List[str] = dataclasses.field(default_factory=list)
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = dataclasses.field(default_factory=list)
    tie_word_embeddings: bool = False
    rope_scaling: str = ""
    fold_ln: bool = True
    center_unembed: bool = True
    center_writing_weights: bool = False  # RMSNorm: nothing to centre
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = True
    normalization_type: str = "RMSPre"
    positional_embedding_type: str = "rotary"
    act_fn: str = "silu"
    gated_mlp: bool = True
    attn_only: bool = False
    final_rms: bool = True
    original_architecture: str = "LlamaForCausalLM"

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_devices(self) -> int:
        return max(1, len(self.server_devices))

    @property
    def ungroup_grouped_query_attention(self) -> bool:
        return False

    @classmethod
    def from_model_info(cls, info: remotelens_pb2.ModelInfo, fold_ln: bool) -> "HookedTransformerConfig":
        return cls(
            model_name=info.model_name,
            n_layers=int(info.n_layers),
            d_model=int(info.d_model),
            n_heads=int(info.n_heads),
            n_key_value_heads=int(info.n_key_value_heads),
            d_head=int(info.d_head),
            d_mlp=int(info.d_mlp),
            d_vocab=int(info.d_vocab),
            n_ctx=int(info.n_ctx),
            eps=float(info.rms_norm_eps),
            rotary_base=float(info.rope_theta),
            dtype=dtype_from_proto(info.dtype),
            server_devices=list(info.devices),
            bos_token_id=int(info.bos_token_id) if info.bos_token_id >= 0 else None,
            eos_token_ids=[int(i) for i in info.eos_token_ids],
            tie_word_embeddings=bool(info.tie_word_embeddings),
            rope_scaling=info.rope_scaling,
            fold_ln=fold_ln,
            normalization_type="RMSPre" if fold_ln else "RMS",
        )
