"""HookedTransformer's analysis surface: callable submodules and weight-circuit helpers.

    resid = cache["resid_post", 2]
    logits = model.unembed(model.ln_final(resid))      # logit lens, [batch, pos, d_vocab]
    model.blocks[3](cache["resid_pre", 3])             # one block, run on the server
    model.QK[1, 4].eigenvalues                         # FactoredMatrix of layer 1, head 4
    model.all_composition_scores("K")                  # [n_layers, n_heads, n_layers, n_heads]

The norms, the embedding and the unembedding are computed here from the weights the client
fetches (they are small next to a block); blocks run on the server (start_at_layer /
stop_at_layer). Semantics follow TransformerLens 3's HookedTransformer (HookedTransformer.py:
QK, OV, accumulated_bias, all_composition_scores, all_head_labels, input_to_embed;
components/rms_norm.py, rms_norm_pre.py, embed.py, unembed.py).
"""

from typing import List, Optional, Tuple

import torch

from .factored_matrix import FactoredMatrix

__all__ = ["AnalysisMixin"]


class AnalysisMixin:
    """Needs self.cfg, weight properties (WeightsMixin), to_tokens and _forward_impl."""

    # ------------------------------------------------------------------ callable submodules

    def _embed_tokens(self, tokens) -> torch.Tensor:
        """W_E[tokens]: [*tokens.shape, d_model]."""
        tokens = torch.as_tensor(tokens)
        if tokens.is_floating_point():
            raise TypeError("embed takes int64 token ids")
        W_E = self.W_E
        return W_E[tokens.to(W_E.device).long()]

    def _unembed(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_U + b_U with the processed W_U: [..., d_vocab]."""
        W_U = self.W_U.to(x.device, x.dtype)
        return x @ W_U + self.b_U.to(x.device, x.dtype)

    def _apply_norm(self, weight_name: str, layer: Optional[int], x: torch.Tensor) -> torch.Tensor:
        """An RMSNorm on x [..., d_model]: x / sqrt(mean(x^2) + eps), computed in float32, times
        the norm's weight unless fold_ln moved that weight into the next matrices (TL's
        RMSNormPre)."""
        x = torch.as_tensor(x)
        if x.size(-1) != self.cfg.d_model:
            raise ValueError(f"a norm takes [..., d_model={self.cfg.d_model}], got {tuple(x.shape)}")
        x32 = x.float()
        normalised = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        if not self.cfg.fold_ln:
            w = self._fetch_raw_weight(weight_name, layer)
            normalised = normalised * w.to(normalised.device, torch.float32)
        return normalised.to(x.dtype)

    def _block_forward(self, layer: int, resid_pre: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block `layer` on a residual stream [batch, pos, d_model] -> its resid_post, on the
        server, with the model's active hooks of that block."""
        resid_pre = torch.as_tensor(resid_pre)
        if resid_pre.dim() != 3:
            raise ValueError(f"a block takes the residual stream [batch, pos, d_model], got "
                             f"{tuple(resid_pre.shape)}")
        return self._forward_impl(resid_pre, start_at_layer=layer, stop_at_layer=layer + 1,
                                  attention_mask=attention_mask)[0]

    def input_to_embed(self, input, prepend_bos: Optional[bool] = None,
                       padding_side: Optional[str] = None,
                       attention_mask: Optional[torch.Tensor] = None, past_kv_cache=None
                       ) -> Tuple[torch.Tensor, torch.Tensor, None, Optional[torch.Tensor]]:
        """The residual stream entering block 0, as TransformerLens's input_to_embed.

        The embedding is taken on the server (stop_at_layer=0), so hooks on hook_embed apply.

        Args:
            input: a text, texts, or tokens [batch, pos] / [pos].
            prepend_bos, padding_side: as for to_tokens.
            attention_mask: [batch, pos]; computed from left padding when not given.
            past_kv_cache: unsupported (must be None).

        Returns:
            (residual [batch, pos, d_model], tokens [batch, pos], None (no shortformer
            positional embedding: Llama is rotary), attention_mask or None).
        """
        if past_kv_cache is not None:
            raise NotImplementedError("past_kv_cache is not supported")
        side = padding_side or self.tokenizer.padding_side
        if isinstance(input, (str, list)):
            tokens, mask = self._encode([input] if isinstance(input, str) else input,
                                        prepend_bos, padding_side)
        else:
            tokens = self._as_tokens(input)
            mask = self._infer_attention_mask(tokens) if side == "left" else None
            if side == "left" and mask is None:
                mask = torch.ones_like(tokens)
        if attention_mask is None and side == "left":
            # TransformerLens computes a mask whenever the padding side is left.
            attention_mask = mask
        residual = self._forward_impl(tokens, stop_at_layer=0, attention_mask=attention_mask)[0]
        return residual, tokens, None, attention_mask

    # ------------------------------------------------------------------ circuits

    @property
    def QK(self) -> FactoredMatrix:
        """FactoredMatrix(W_Q, W_K^T): [n_layers, n_heads, d_model, d_model], key heads repeated."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """FactoredMatrix(W_V, W_O): [n_layers, n_heads, d_model, d_model], value heads repeated."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> List[str]:
        """"L{layer}H{head}" for every head, layer-major."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> torch.Tensor:
        """Sum of b_O (and b_out) of blocks before `layer` (plus b_O of `layer` with mlp_input):
        [d_model]. Llama has no biases, so this is zeros, as TransformerLens gives."""
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer={layer}; valid: 0..{self.cfg.n_layers}")
        if mlp_input and layer >= self.cfg.n_layers:
            raise ValueError("Cannot include attn_bias from beyond the final layer")
        total = torch.zeros(self.cfg.d_model, device=self.cfg.device)
        for l in range(layer):
            total = total + self._layer_weight("b_O", l).to(total.device, total.dtype)
            if include_mlp_biases:
                total = total + self._layer_weight("b_out", l).to(total.device, total.dtype)
        if mlp_input:
            total = total + self._layer_weight("b_O", layer).to(total.device, total.dtype)
        return total

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """Composition scores of every (earlier head, later head) pair: [L1, H1, L2, H2].

        Args:
            mode: "Q", "K" or "V": the later head's QK (query side), QK^T (key side) or OV
                circuit composed with the earlier head's OV circuit.

        Returns:
            Scores, zero wherever the later head is not in a later layer.
        """
        left = self.OV
        if mode == "Q":
            right = self.QK
        elif mode == "K":
            right = self.QK.T
        elif mode == "V":
            right = self.OV
        else:
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode}")
        # utilities/matrix.composition_scores over all pairs at once materialises
        # [L, H, L, H, d_head, d_head]: 64 GiB for Llama 3.1 8B. The same scores, one earlier
        # head at a time and only against later layers (the others are zero).
        n, h = self.cfg.n_layers, self.cfg.n_heads
        inner_left, inner_right = left.collapse_l(), right.collapse_r()  # drop orthogonal factors
        left_norms = torch.linalg.matrix_norm(inner_left)  # [L, H]
        right_norms = torch.linalg.matrix_norm(inner_right)  # [L, H]
        scores = torch.zeros(n, h, n, h, dtype=inner_left.dtype, device=inner_left.device)
        for l1 in range(n - 1):
            for h1 in range(h):
                product = torch.linalg.matrix_norm(inner_left[l1, h1] @ inner_right[l1 + 1:])  # [L', H]
                scores[l1, h1, l1 + 1:] = product / left_norms[l1, h1] / right_norms[l1 + 1:]
        return scores

    def _center_logits(self, logits: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """With center_unembed, the logits the centred W_U gives: minus their mean over d_vocab.

        Args:
            logits: [..., d_vocab].
            in_place: edit `logits` (a freshly decoded tensor nobody else holds): no second
                [batch, pos, d_vocab] buffer.
        """
        if not getattr(self.cfg, "center_unembed", False) or logits is None:
            return logits
        mean = logits.mean(-1, keepdim=True)
        return logits.sub_(mean) if in_place else logits - mean
