"""generate() and generate_stream() for HookedTransformer.

When every active hook is a remotelens.ops op (or there are none) generation runs entirely on the
server (Generate RPC): prefill, then one token per step through a KV cache, with the hooks
applied at every step, exactly as TransformerLens applies hooks inside generate(); at decode steps
the hooks see only the new position, as with TransformerLens's past_kv_cache.

Python callables as hooks run on the server's generation too (RunInteractive with a
GenerateRequest): the server calls them back at every step, so with the KV cache a hook sees the
prompt at the first step and then only the new position, as TransformerLens's generate does with
use_past_kv_cache=True (with use_past_kv_cache=False, the whole sequence each step).

Only freq_penalty makes the client drive generation itself: one forward pass over the whole
sequence per step, sampling here.
"""

import codecs
import queue
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import grpc
import torch
import tqdm

from . import utils
from ._run import answer_hook_call
from ._wire import ChunkAssembler, tensor_from_proto, tensor_to_proto
from .errors import from_rpc_error
from .v1 import remotelens_pb2 as pb


class GenerationMixin:
    """Generation methods; needs the HookedTransformer internals."""

    def _generation_input(self, input, prepend_bos, padding_side) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
        """(tokens [batch, pos], attention_mask or None, input kind "str" | "tokens")."""
        if isinstance(input, str):
            tokens, mask = self._encode([input], prepend_bos, padding_side)
            return tokens, None, "str"
        if isinstance(input, list) and all(isinstance(s, str) for s in input):
            # Left padding keeps every row's last real token at the last position.
            tokens, mask = self._encode(input, prepend_bos, "left" if len(input) > 1 else padding_side)
            return tokens, (mask if bool((mask == 0).any()) else None), "str"
        if isinstance(input, torch.Tensor) and input.is_floating_point():
            raise NotImplementedError("generate from embeddings is not supported by remotelens; "
                                      "pass text or token ids")
        tokens = self._as_tokens(input)
        return tokens, self._infer_attention_mask(tokens), "tokens"

    def _eos_ids(self, eos_token_id) -> List[int]:
        if eos_token_id is None:
            return []
        if isinstance(eos_token_id, int):
            return [eos_token_id]
        return [int(i) for i in eos_token_id]

    def _iter_generate(self, tokens: torch.Tensor, mask: Optional[torch.Tensor],
                       max_new_tokens: int, stop_at_eos: bool, eos_ids: List[int],
                       do_sample: bool, top_k, top_p, temperature: float, freq_penalty: float,
                       use_past_kv_cache: bool, seed: Optional[int],
                       step_cache_names: Sequence[str] = ()) -> Iterator[Tuple[str, object]]:
        """Yields ("step", new tokens [batch] plus their bytes) per step, then ("done", sequences).
        With step_cache_names, each step's activations follow its step as ("tensor", (name, t))."""
        if temperature == 0.0:
            do_sample = False
        if do_sample and seed is None:
            # Drawn from torch's global generator, so torch.manual_seed() makes runs repeatable.
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        hooks = self._active_hooks()
        if freq_penalty:
            if step_cache_names:
                raise ValueError("caching during generation needs server-side generation: "
                                 "no freq_penalty")
            yield from self._iter_generate_client(tokens, mask, max_new_tokens, stop_at_eos, eos_ids,
                                                  do_sample, top_k, top_p, temperature,
                                                  freq_penalty, seed)
            return
        hook_ops, callbacks, needs_session = self._hook_ops(hooks)
        request = pb.GenerateRequest(
            tokens=tensor_to_proto(tokens), max_new_tokens=int(max_new_tokens),
            sampling=pb.SamplingParams(do_sample=bool(do_sample), temperature=float(temperature),
                                       top_k=int(top_k or 0), top_p=float(top_p or 0.0),
                                       seed=int(seed or 0)),
            stop_at_eos=bool(stop_at_eos), eos_token_ids=eos_ids,
            use_past_kv_cache=bool(use_past_kv_cache), disable_kv_cache=not use_past_kv_cache,
            hooks=hook_ops)
        if mask is not None:
            request.attention_mask.CopyFrom(tensor_to_proto(mask))
        if needs_session:
            request.session_id = self._session_id
        if step_cache_names:
            request.step_cache.names.extend(step_cache_names)
            request.step_cache.stream = True
        assembler = ChunkAssembler()
        replies: "queue.Queue" = queue.Queue()
        pending_call = None
        if callbacks:
            # Python hooks: the server calls them back at each step (RunInteractive).
            def requests():
                yield pb.InteractiveRequest(generate=request)
                while True:
                    item = replies.get()
                    if item is None:
                        return
                    yield item
            call = self._stub.RunInteractive(requests(), **self._call_kwargs())
        else:
            call = self._stub.Generate(request, **self._call_kwargs())
        try:
            for response in call:
                kind = response.WhichOneof("item")
                if kind == "tensor":
                    done = assembler.add(response.tensor)
                    if done is None:
                        continue
                    if pending_call is not None:
                        replies.put(pb.InteractiveRequest(reply=answer_hook_call(
                            pending_call, done[1], callbacks, self.cfg.device)))
                        pending_call = None
                    else:
                        yield "tensor", done
                elif kind == "hook_call":
                    pending_call = response.hook_call
                elif kind == "step":
                    yield "step", (torch.tensor(list(response.step.tokens), dtype=torch.int64),
                                   list(response.step.texts))
                elif kind == "done":
                    yield "done", tensor_from_proto(response.done.sequences)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            replies.put(None)
            call.cancel()

    def _iter_generate_client(self, tokens, mask, max_new_tokens, stop_at_eos, eos_ids, do_sample,
                              top_k, top_p, temperature, freq_penalty, seed):
        """Client-driven generation: a full forward pass with the hooks per step."""
        if stop_at_eos and not (eos_ids or self.cfg.eos_token_ids):
            raise ValueError("stop_at_eos is set but the model defines no eos token id; "
                             "pass eos_token_id or stop_at_eos=False")
        if tokens.shape[1] + max_new_tokens > self.cfg.n_ctx:
            raise ValueError(f"prompt of {tokens.shape[1]} positions plus max_new_tokens "
                             f"{max_new_tokens} exceeds the model's n_ctx of {self.cfg.n_ctx}")
        stop_ids = torch.tensor(eos_ids or self.cfg.eos_token_ids or [-1])
        pad_id = int(stop_ids[0])
        generator = torch.Generator().manual_seed(seed) if do_sample else None
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
        sequence = tokens
        for _ in range(max_new_tokens):
            logits = self._forward_impl(sequence, attention_mask=mask, return_type="logits")[0]
            final = logits[:, -1, :].float().cpu()
            if do_sample:
                new = utils.sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature,
                                          freq_penalty=freq_penalty, tokens=sequence,
                                          generator=generator)
            else:
                new = final.argmax(dim=-1)
            if stop_at_eos:
                new = torch.where(finished, torch.full_like(new, pad_id), new)
                finished |= torch.isin(new, stop_ids)
            sequence = torch.cat([sequence, new[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(new[:, None])], dim=1)
            yield "step", (new, None)
            if stop_at_eos and bool(finished.all()):
                break
        yield "done", sequence

    def generate(self, input: Union[str, List[str], torch.Tensor] = "", max_new_tokens: int = 10,
                 stop_at_eos: bool = True, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 do_sample: bool = True, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: Optional[bool] = None,
                 padding_side: Optional[str] = None, return_type: Optional[str] = "input",
                 verbose: bool = True, seed: Optional[int] = None):
        """Samples up to max_new_tokens tokens per row, with the model's active hooks applied.

        Args:
            input: a text, a list of texts (left-padded), or int64 tokens [batch, pos].
            max_new_tokens: tokens to generate per row.
            stop_at_eos: stop a row at an end-of-sequence token (later steps repeat the first
                eos id), and stop when every row has stopped.
            eos_token_id: an id or list of ids; default the model's.
            do_sample: sample; False is greedy (argmax). temperature=0 is greedy too.
            top_k: keep the k most likely tokens.
            top_p: keep the fewest tokens whose probability reaches top_p.
            temperature: divides the logits.
            freq_penalty: subtract this times each token's count so far (client-driven path).
            use_past_kv_cache: decode through the server's KV cache (False: re-run the whole
                sequence at each step; hooks then see every position every step).
            prepend_bos: prepend BOS to texts (default cfg.default_prepend_bos).
            padding_side: for a single text; batches of texts are always left-padded.
            return_type: "input" (text for text input, tokens for tokens), "str" or "tokens".
            verbose: show a tqdm progress bar.
            seed: sampling seed; default drawn from torch's global generator.

        Returns:
            Text (str for one row, list for several; special tokens removed) or int64 tokens
            [batch, pos + generated].
        """
        if return_type not in ("input", "str", "tokens", "embeds"):
            raise ValueError("return_type must be one of ['input', 'str', 'tokens', 'embeds']")
        if return_type == "embeds":
            raise NotImplementedError("return_type='embeds' is not supported by remotelens")
        tokens, mask, kind = self._generation_input(input, prepend_bos, padding_side)
        if return_type == "input":
            return_type = "str" if kind == "str" else "tokens"
        sequences = None
        with tqdm.tqdm(total=max_new_tokens, disable=not verbose) as bar:
            for what, value in self._iter_generate(
                    tokens, mask, max_new_tokens, stop_at_eos, self._eos_ids(eos_token_id),
                    do_sample, top_k, top_p, temperature, freq_penalty, use_past_kv_cache, seed):
                if what == "step":
                    bar.update(1)
                else:
                    sequences = value
        if return_type == "tokens":
            return self._to_device(sequences)
        rows = sequences.tolist()
        if mask is not None:  # drop the left padding
            width = mask.shape[1]
            rows = [[t for j, t in enumerate(r) if j >= width or mask[i, j]] for i, r in enumerate(rows)]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return texts[0] if len(texts) == 1 else texts

    def generate_with_cache(self, input: Union[str, List[str], torch.Tensor], max_new_tokens: int = 10,
                            names_filter: Union[str, Sequence[str]] = (), stop_at_eos: bool = False,
                            do_sample: bool = False, prepend_bos: Optional[bool] = None,
                            use_past_kv_cache: bool = True, **sampling):
        """Generates on the server and streams the named activations of every step.

        Args:
            input: a text, a list of texts (left-padded), or int64 tokens [batch, pos].
            max_new_tokens: tokens to generate per row.
            names_filter: a hook name or list of names to capture at every step.
            stop_at_eos, do_sample, prepend_bos, use_past_kv_cache: as generate().
            **sampling: top_k, top_p, temperature, seed, eos_token_id as generate().

        Returns:
            (tokens [batch, pos + generated], [one {name: activation} per step]). With the KV
            cache, step 0's activations cover the prompt and each later step's only the new
            position (the forward each step runs); without it, every position each step.

        Raises:
            ValueError: Python hook functions are active (they need client-driven steps).
            KeyError: an unknown hook name.
        """
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for name in names:
            self._hook_point(name)  # ValueError naming the valid hooks
        tokens, mask, _ = self._generation_input(input, prepend_bos, None)
        steps: List[dict] = []
        sequences = None
        for what, value in self._iter_generate(
                tokens, mask, max_new_tokens, stop_at_eos, self._eos_ids(sampling.get("eos_token_id")),
                do_sample, sampling.get("top_k"), sampling.get("top_p"),
                sampling.get("temperature", 1.0), 0.0, use_past_kv_cache, sampling.get("seed"),
                step_cache_names=names):
            if what == "step":
                steps.append({})
            elif what == "tensor":
                steps[-1][value[0]] = self._to_device(value[1])
            else:
                sequences = value
        return self._to_device(sequences), steps

    def generate_stream(self, input: Union[str, torch.Tensor] = "", max_new_tokens: int = 10,
                        max_tokens_per_yield: int = 1, stop_at_eos: bool = True,
                        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                        do_sample: bool = True, top_k: Optional[int] = None,
                        top_p: Optional[float] = None, temperature: float = 1.0,
                        freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                        prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                        return_type: Optional[str] = "input", verbose: bool = False,
                        seed: Optional[int] = None):
        """Like generate(), yielding new tokens as the server produces them.

        Unlike TransformerLens's generate_stream, the first yield does not repeat the prompt:
        every yield holds only tokens generated since the previous one.

        Args:
            max_tokens_per_yield: yield after this many steps (default every step).
            return_type: "input" (text for text input, tokens for tokens), "str" or "tokens".
            (the other arguments are generate()'s)

        Yields:
            For "str": the new text (str for one row, list of str for several), decoded
            incrementally so characters split across tokens come out whole. For "tokens":
            int64 [batch, n] with the n new tokens.
        """
        if return_type not in ("input", "str", "tokens"):
            raise ValueError("return_type must be one of ['input', 'str', 'tokens']")
        tokens, mask, kind = self._generation_input(input, prepend_bos, padding_side)
        as_text = return_type == "str" or (return_type == "input" and kind == "str")
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace")
                    for _ in range(tokens.shape[0])]
        special = set(self.tokenizer.special_token_ids()) if as_text else set()
        pending: List[torch.Tensor] = []
        pending_bytes: List[List[bytes]] = [[] for _ in decoders]

        def flush():
            if as_text:
                out = [d.decode(b"".join(parts)) for d, parts in zip(decoders, pending_bytes)]
                for parts in pending_bytes:
                    parts.clear()
                pending.clear()
                return out[0] if len(out) == 1 else out
            out = torch.stack(pending, dim=1)
            pending.clear()
            return self._to_device(out)

        bar = tqdm.tqdm(total=max_new_tokens, disable=not verbose)
        try:
            for what, value in self._iter_generate(
                    tokens, mask, max_new_tokens, stop_at_eos, self._eos_ids(eos_token_id),
                    do_sample, top_k, top_p, temperature, freq_penalty, use_past_kv_cache, seed):
                if what != "step":
                    continue
                bar.update(1)
                new, texts = value
                pending.append(new)
                if as_text:
                    if texts is None:
                        texts = [self._token_bytes(int(t)) for t in new]
                    for i, (t, b) in enumerate(zip(new.tolist(), texts)):
                        if t not in special:
                            pending_bytes[i].append(b)
                if len(pending) >= max_tokens_per_yield:
                    yield flush()
            if pending:
                yield flush()
        finally:
            bar.close()

    def _token_bytes(self, token: int) -> bytes:
        response = self._unary("Detokenize", pb.DetokenizeRequest(
            rows=[pb.TokenRow(ids=[token])], return_str_tokens=True))
        return response.str_tokens[0].tokens[0]

