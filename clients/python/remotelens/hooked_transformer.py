"""HookedTransformer: TransformerLens's model API over a remotelens server.

    from remotelens import HookedTransformer, ops
    model = HookedTransformer.from_server("127.0.0.1:50051", api_key="...")
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    cache["resid_post", 1]                                       # [1, pos, d_model]

    def ablate_head(z, hook):                                    # a Python hook ...
        z[:, :, 2] = 0
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate_head)])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ops.zero(head=2))])  # ... or on the server

Hooks live on this object, as in TransformerLens (add_hook, hooks(), reset_hooks). At each
forward pass every active hook is sent with the request: remotelens.ops ops run on the server;
Python callables run here, called back by the server over a bidirectional stream
(RunInteractive) with the activation, and may return a replacement or edit it in place.

Returned tensors are CPU tensors (or on cfg.device after model.to(device)); the server's own
devices are in cfg.server_devices.
"""

import contextlib
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import grpc
import grpc.experimental
import torch

from . import metrics as metrics_module
from . import ops as ops_module
from . import readouts as readouts_module
from ._analysis import AnalysisMixin
from ._generation import GenerationMixin
from ._run import Progress, execute_run, pos_dim, server_pos_slice
from ._tokens import TokensMixin
from ._version import check_api_version
from ._hooks import HookPoint, HookPointInfo, build_module_tree
from ._weights import WeightsMixin
from ._wire import ChunkAssembler, tensor_to_proto
from .activation_cache import ActivationCache, _RemoteTensors
from .config import HookedTransformerConfig
from .past_key_value_caching import HookedTransformerKeyValueCache
from .errors import ResourceExhaustedError, from_rpc_error, translate_rpc_errors
from .tokenizer import RemoteTokenizer
from .utils import Slice, lm_cross_entropy_loss
from .v1 import hooks_pb2, remotelens_pb2 as pb, remotelens_pb2_grpc

__all__ = ["HookedTransformer", "Output"]

class _ServerBackward(torch.autograd.Function):
    """The model's output as a node of the notebook's torch graph. Its backward hands
    d(value)/d(output) to `run_backward`, which has the server back-propagate it through the
    model; nothing upstream of the output is a torch tensor, so it returns no gradients."""

    @staticmethod
    def forward(ctx, anchor, output, run_backward):  # noqa: D102
        ctx.run_backward = run_backward
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        ctx.run_backward(grad_output)
        return None, None, None


_RETURN_TYPES = {"logits": pb.RETURN_TYPE_LOGITS, "loss": pb.RETURN_TYPE_LOSS,
                 "both": pb.RETURN_TYPE_BOTH, None: pb.RETURN_TYPE_NONE}


class Output(NamedTuple):
    """forward(return_type="both")."""

    logits: torch.Tensor
    loss: torch.Tensor


class HookedTransformer(TokensMixin, WeightsMixin, AnalysisMixin, GenerationMixin):
    """A Llama model resident on a remotelens server, driven with TransformerLens's API.

    Construct with from_server(). Attributes: cfg (HookedTransformerConfig), tokenizer
    (RemoteTokenizer), hook_dict (name -> HookPoint, forward order), mod_dict, blocks[L] (with
    .attn/.mlp/.ln1/.ln2 and their hook points and weights), ln_final, hook_embed. embed,
    unembed, ln_final, blocks[L].ln1/ln2 and blocks[L] itself are callable, as in TransformerLens.
    """

    # Cache and weight downloads larger than this show a tqdm progress bar (None: never).
    progress_bar_min_bytes: Optional[int] = 64 << 20

    def __init__(self, channel: grpc.Channel, metadata: Sequence[Tuple[str, str]],
                 timeout: Optional[float], fold_ln: bool = True, session_ttl_seconds: int = 0,
                 address: str = "", center_unembed: bool = True):
        self._channel = channel
        self._stub = remotelens_pb2_grpc.RemoteLensStub(channel)
        self._metadata = list(metadata)
        self._timeout = timeout
        self.address = address
        info = self._unary("GetModelInfo", pb.GetModelInfoRequest())
        check_api_version(info, address)
        self.cfg = HookedTransformerConfig.from_model_info(info, fold_ln)
        self.cfg.center_unembed = bool(center_unembed)
        self._init_weights_cache()
        # The server's hook points (TransformerLens 3 names, forward order): what goes on the wire.
        self._hook_index = {h.name: i for i, h in enumerate(info.hooks)}
        self._wire_shapes = {h.name: tuple(h.shape) for h in info.hooks}
        self._hook_infos = {h.name: HookPointInfo.from_proto(h) for h in info.hooks}
        self.hook_dict: Dict[str, HookPoint] = self._make_hook_dict()
        self.mod_dict = build_module_tree(self, self.hook_dict, self.cfg.n_layers, self._weight_attr)
        self.tokenizer = RemoteTokenizer(self, info)
        self.context_level = 0
        self._session_ttl_seconds = session_ttl_seconds
        self._session_id: Optional[str] = None
        try:
            self._open_session()
        except ResourceExhaustedError as e:
            # Too many open sessions (e.g. a notebook cell re-run many times): everything but
            # store=True still works; the session is retried when first needed.
            warnings.warn(f"remotelens: no server session ({e}); stored caches are unavailable "
                          f"until one can be opened. Close unused models with model.close().")

    def _open_session(self) -> str:
        """The session for stored caches, opened now if there is none."""
        if self._session_id is None:
            self._session_id = self._unary("CreateSession", pb.CreateSessionRequest(
                ttl_seconds=self._session_ttl_seconds)).session_id
        return self._session_id

    @classmethod
    def from_server(cls, address: Optional[str] = None, api_key: Optional[str] = None,
                    root_certificates: Optional[Union[bytes, str]] = None,
                    timeout: Optional[float] = None, fold_ln: bool = True,
                    session_ttl_seconds: int = 0,
                    channel_options: Sequence[Tuple[str, Any]] = (), center_unembed: bool = True,
                    center_writing_weights: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False) -> "HookedTransformer":
        """Connects to a remotelens server and opens a session on it.

        Processing defaults are TransformerLens from_pretrained's, where they apply to a Llama
        (RMSNorm, no biases): fold_ln and center_unembed on. from_server_no_processing() turns
        them off (TransformerLens's from_pretrained_no_processing).

        Args:
            address: host:port; default $REMOTELENS_ADDRESS, else "127.0.0.1:50051".
            api_key: sent as "authorization: Bearer <key>"; default $REMOTELENS_API_KEY.
            root_certificates: PEM bytes, or a path to a PEM file, of the CA that signed the
                server's certificate; enables TLS. None: plaintext.
            timeout: seconds allowed for each call (a whole streamed run); None: no deadline.
            fold_ln: fold RMSNorm weights into W_Q/W_K/W_V/W_in/W_gate/W_U (TransformerLens's
                from_pretrained default); the norms become weightless (model.ln_final(x) is
                x / rms); activations, hook_normalized included, are unaffected.
            session_ttl_seconds: idle time before the server frees the session and its stored
                caches; 0: the server's default.
            channel_options: extra grpc channel options.
            center_unembed: subtract W_U's mean over the vocabulary (TransformerLens's default):
                returned logits are shifted by their per-position mean; log-probabilities, the
                loss and generation do not change.
            center_writing_weights, fold_value_biases: accepted for TransformerLens
                compatibility; no effect on an RMSNorm model without biases (TransformerLens
                skips them silently too).
            refactor_factored_attn_matrices: must be False (not supported).

        Returns:
            The model.
        """
        if refactor_factored_attn_matrices:
            raise NotImplementedError("refactor_factored_attn_matrices is not supported by remotelens")
        address = address or os.environ.get("REMOTELENS_ADDRESS") or "127.0.0.1:50051"
        api_key = api_key if api_key is not None else os.environ.get("REMOTELENS_API_KEY")
        options = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", -1),
                   # Read server streams on the calling thread: no helper thread per call.
                   (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
                   *channel_options]
        if root_certificates is not None:
            if isinstance(root_certificates, str):
                with open(root_certificates, "rb") as f:
                    root_certificates = f.read()
            channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=root_certificates), options)
        else:
            channel = grpc.insecure_channel(address, options)
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        try:
            return cls(channel, metadata, timeout, fold_ln, session_ttl_seconds, address,
                       center_unembed=center_unembed)
        except BaseException:
            channel.close()
            raise

    @classmethod
    def from_server_no_processing(cls, address: Optional[str] = None, fold_ln: bool = False,
                                  center_writing_weights: bool = False,
                                  center_unembed: bool = False, **kwargs) -> "HookedTransformer":
        """from_server with every weight processing off (TransformerLens's
        from_pretrained_no_processing): the checkpoint's weights and the model's raw logits.

        Args:
            address: as for from_server.
            fold_ln, center_writing_weights, center_unembed: default False here.
            **kwargs: from_server's other arguments.
        """
        return cls.from_server(address, fold_ln=fold_ln, center_unembed=center_unembed,
                               center_writing_weights=center_writing_weights, **kwargs)

    def __repr__(self) -> str:
        return (f"HookedTransformer(model_name={self.cfg.model_name!r}, address={self.address!r}, "
                f"n_layers={self.cfg.n_layers}, d_model={self.cfg.d_model})")

    # ------------------------------------------------------------------ plumbing

    def _call_kwargs(self) -> Dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self._timeout}

    def _unary(self, method: str, request):
        with translate_rpc_errors():
            return getattr(self._stub, method)(request, **self._call_kwargs())

    @property
    def session_id(self) -> Optional[str]:
        """The server session holding this model's stored caches."""
        return self._session_id

    def close(self) -> None:
        """Closes the server session (freeing stored caches) and the channel."""
        if self._session_id is not None:
            try:
                self._unary("CloseSession", pb.CloseSessionRequest(session_id=self._session_id))
            except Exception:  # the session may have expired; the channel closes regardless
                pass
            self._session_id = None
        self._channel.close()

    def __enter__(self) -> "HookedTransformer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _to_device(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None or self.cfg.device in ("cpu", torch.device("cpu")):
            return tensor
        return tensor.to(self.cfg.device)

    def to(self, device_or_dtype, print_details: bool = False) -> "HookedTransformer":
        """Sets where returned tensors go (the server's devices are unchanged)."""
        if isinstance(device_or_dtype, (str, torch.device)):
            self.cfg.device = str(device_or_dtype)
        return self

    def cuda(self, device: Optional[int] = None) -> "HookedTransformer":
        return self.to(f"cuda:{device}" if device is not None else "cuda")

    def cpu(self) -> "HookedTransformer":
        return self.to("cpu")

    def eval(self) -> "HookedTransformer":
        return self

    def train(self, mode: bool = True) -> "HookedTransformer":
        if mode:
            raise NotImplementedError("remotelens models are inference-only")
        return self

    # ------------------------------------------------------------------ hooks

    def _make_hook_dict(self) -> Dict[str, HookPoint]:
        """name -> HookPoint as the notebook sees them; here the server's names themselves."""
        return {name: self._new_hook_point(name, name) for name in self._wire_shapes}

    def _new_hook_point(self, name: str, wire_name: str) -> HookPoint:
        """A HookPoint for server hook point `wire_name`, with the dims the server lists."""
        info = self._hook_infos.get(wire_name)
        return HookPoint(name, self._wire_shapes[wire_name], wire_name=wire_name,
                         pos_dim=info.pos_dim if info is not None and info.dims else None,
                         head_dim=info.head_dim if info is not None and info.dims else None)

    def _pos_dim_from_end(self, wire_name: str) -> int:
        """The position dimension of a server hook point's tensor (or of its "_grad"), counted
        from the end, as the server lists it."""
        base = wire_name[:-len("_grad")] if wire_name.endswith("_grad") else wire_name
        info = self._hook_infos.get(base)
        if info is None or not info.dims:  # a server that does not list dims
            return pos_dim(wire_name)
        return info.pos_dim - len(info.shape)

    def hook_points(self):
        """Every HookPoint once, in forward order."""
        return self.hook_dict.values()

    def _matching_hook_points(self, name: Union[str, Callable[[str], bool]]) -> List[Tuple[str, HookPoint]]:
        """(name, HookPoint) for a hook name or a name filter; each HookPoint at most once."""
        if isinstance(name, str):
            return [(name, self._hook_point(name))]
        out, seen = [], set()
        for n in self._firing_names():
            hp = self.hook_dict[n]
            if id(hp) not in seen and name(n):
                seen.add(id(hp))
                out.append((n, hp))
        return out

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Whether attn.hook_result (per-head outputs) is cached by default and may be hooked."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Whether blocks.L.hook_q_input / hook_k_input / hook_v_input run: separate copies of
        resid_pre per query head (per key/value head for k and v), each normalised by ln1 on its
        own, so one head's input can be patched alone. Costs memory and time only for the hook
        points a run actually hooks or caches."""
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Whether blocks.L.hook_mlp_in runs: the MLP's input (resid_mid, before ln2); editing it
        changes the MLP's output but not the residual stream."""
        assert not self.cfg.attn_only, "Can't use hook_mlp_in with attn_only model"
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Whether blocks.L.hook_attn_in runs: resid_pre repeated per head, feeding queries, keys
        and values. As in TransformerLens 3, not with grouped-query attention (Llama 3.1 has
        it): use set_use_split_qkv_input, or TransformerBridge, whose use_attn_in allows it."""
        assert self.cfg.n_key_value_heads == self.cfg.n_heads, (
            "Can't use attn_in with GroupedQueryAttention, please use split_qkv_input instead")
        self.cfg.use_attn_in = bool(use_attn_in)

    def _flag_is_on(self, wire_name: str) -> bool:
        """Whether the TransformerLens flag that gates this server hook point (if any) is on."""
        info = self._hook_infos.get(wire_name)
        flag = info.enabled_by if info is not None else ""
        if not flag and wire_name.endswith("attn.hook_result"):
            flag = "use_attn_result"  # a server that does not send enabled_by
        return not flag or bool(getattr(self.cfg, flag, False))

    def _firing_names(self) -> List[str]:
        """Hook names a filter function is evaluated over: those whose TransformerLens flag (if
        any) is on, e.g. hook_result only with use_attn_result."""
        return [n for n, hp in self.hook_dict.items() if self._flag_is_on(hp.wire_name)]

    def check_hooks_to_add(self, hook_point: HookPoint, hook_point_name: str, hook: Callable,
                           dir: str = "fwd", is_permanent: bool = False, prepend: bool = False) -> None:
        """TransformerLens's checks: an opt-in hook point needs its flag (set_use_attn_result,
        set_use_split_qkv_input, set_use_hook_mlp_in, set_use_attn_in)."""
        if not self._flag_is_on(hook_point.wire_name):
            info = self._hook_infos.get(hook_point.wire_name)
            flag = info.enabled_by if info is not None and info.enabled_by else "use_attn_result"
            # TransformerLens 3's wording (HookedTransformer.check_hooks_to_add).
            shown = "use_attn_result_hook" if flag == "use_attn_result" else flag
            raise AssertionError(f"Cannot add hook {hook_point_name} if {shown} is False")

    def supported_hook_points(self) -> List["HookPointInfo"]:
        """What the server says about each hook point, in forward order (capability
        introspection, as TransformerLens 4 lists a bridge's supported hook points): its name
        here, its other names, shape, dimension names, which dims hold positions and heads,
        the flag that enables it and whether it is on, and backward support."""
        out = []
        for name, hp in self.hook_dict.items():
            if name != hp.name:
                continue  # an alias: listed under its hook point's own name
            info = self._hook_infos[hp.wire_name]
            out.append(info.renamed(name, self._other_names(name, hp), self._flag_is_on(hp.wire_name)))
        return out

    def _other_names(self, name: str, hook_point: HookPoint) -> List[str]:
        """Other names of this hook point: here the TransformerLens 4 bridge names."""
        return list(self._hook_infos[hook_point.wire_name].aliases)

    def _hook_point(self, name: str) -> HookPoint:
        try:
            return self.hook_dict[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a hook point of {self.cfg.model_name}; see "
                           f"model.hook_dict (e.g. {list(self.hook_dict)[1:3]})") from None

    def add_hook(self, name: Union[str, Callable[[str], bool]], hook: Callable, dir: str = "fwd",
                 is_permanent: bool = False, level: Optional[int] = None,
                 prepend: bool = False) -> None:
        """Registers a hook on this model object (it applies to every later forward pass).

        Args:
            name: a hook name, or a function of hook names selecting several.
            hook: fn(activation, hook) returning None or a replacement, or a remotelens.ops op.
            dir: "fwd", or "bwd" for a remotelens.ops op applied to gradients.
            is_permanent: survive reset_hooks() unless including_permanent=True.
            level: the hooks() context level owning it (None: added directly).
            prepend: apply before the hooks already on that point.
        """
        for n, hp in self._matching_hook_points(name):
            self.check_hooks_to_add(hp, n, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: Union[str, Callable[[str], bool]], hook: Callable,
                       dir: str = "fwd") -> None:
        """add_hook(..., is_permanent=True)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: Optional[int] = None) -> None:
        for hp in self.hook_points():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hp in self.hook_points():
            hp.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: Optional[int] = None) -> None:
        """Removes non-permanent hooks (all hooks with including_permanent=True)."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)

    def _enable_hook(self, name: Union[str, Callable[[str], bool]], hook: Callable, dir: str) -> None:
        for _, hp in self._matching_hook_points(name):
            hp.add_hook(hook, dir=dir, level=self.context_level)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[Tuple[Union[str, Callable], Callable]] = (),
              bwd_hooks: Sequence[Tuple[Union[str, Callable], Callable]] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator["HookedTransformer"]:
        """Context manager: the hooks apply inside the block and are removed at its end.

        Args:
            fwd_hooks: [(name or name filter, hook fn or op)].
            bwd_hooks: [(name or name filter, remotelens.ops op)] applied to gradients when the
                call runs a backward pass (run_with_cache(incl_bwd=True)).
            reset_hooks_end: remove this block's hooks on exit.
            clear_contexts: also clear hook contexts on exit.
        """
        try:
            self.context_level += 1
            for name, hook in fwd_hooks:
                self._enable_hook(name, hook, "fwd")
            for name, hook in bwd_hooks:
                self._enable_hook(name, hook, "bwd")
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=self.context_level)
            self.context_level -= 1

    def run_with_hooks(self, *model_args, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs):
        """forward(*model_args, **model_kwargs) with fwd_hooks added for this call."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self.forward(*model_args, **model_kwargs)

    def _active_hooks(self) -> List[Tuple[HookPoint, Callable]]:
        return [(hp, h.hook) for hp in self.hook_points() for h in hp.fwd_hooks]

    def _has_backward_hooks(self) -> bool:
        return any(hp.bwd_hooks for hp in self.hook_points())

    def _backward_ops(self, first_callback_id: int
                      ) -> Tuple[List[hooks_pb2.HookOp], Dict[int, Tuple[Callable, HookPoint]]]:
        """HookOps (backward = True) for the registered backward hooks, in forward order: ops
        run on the server; Python functions become callbacks numbered from first_callback_id."""
        messages, callbacks = [], {}
        for hp in self.hook_points():
            for h in hp.bwd_hooks:
                if self._is_op(h.hook):
                    op = h.hook.to_proto(hp.wire_name, self._session_id)
                else:
                    callback_id = first_callback_id + len(callbacks)
                    callbacks[callback_id] = (h.hook, hp)
                    op = hooks_pb2.HookOp(hook_name=hp.wire_name, client_callback=hooks_pb2.ClientCallbackOp(
                        callback_id=callback_id))
                op.backward = True
                messages.append(op)
        return messages, callbacks

    @staticmethod
    def _is_op(fn: Callable) -> bool:
        return isinstance(fn, ops_module.HookOperation)

    def _hook_ops(self, hooks: Sequence[Tuple[HookPoint, Callable]]
                  ) -> Tuple[List[hooks_pb2.HookOp], Dict[int, Tuple[Callable, HookPoint]], bool]:
        """HookOps for the active hooks, the callbacks they name, and whether the session is needed."""
        messages, callbacks, needs_session = [], {}, False
        for hp, fn in hooks:
            if self._is_op(fn):
                messages.append(fn.to_proto(hp.wire_name, self._session_id))
                needs_session |= fn.needs_session(self._session_id)
            else:
                callback_id = len(callbacks)
                callbacks[callback_id] = (fn, hp)
                messages.append(hooks_pb2.HookOp(
                    hook_name=hp.wire_name, client_callback=hooks_pb2.ClientCallbackOp(callback_id=callback_id)))
        return messages, callbacks, needs_session

    # ------------------------------------------------------------------ forward

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input, return_type: Optional[str] = "logits", loss_per_token: bool = False,
                prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                start_at_layer: Optional[int] = None, tokens: Optional[torch.Tensor] = None,
                shortformer_pos_embed=None, attention_mask: Optional[torch.Tensor] = None,
                stop_at_layer: Optional[int] = None, past_kv_cache=None):
        """One forward pass with the model's active hooks.

        Args:
            input: a text, a list of texts, int64 tokens [batch, pos] (or [pos]), or with
                start_at_layer the float residual stream [batch, pos, d_model] entering that block.
            return_type: "logits", "loss", "both" (an Output(logits, loss)) or None.
            loss_per_token: loss per position [batch, pos - 1] instead of the mean.
            prepend_bos: prepend BOS to texts (default cfg.default_prepend_bos).
            padding_side: for lists of texts (default tokenizer.padding_side).
            start_at_layer: run blocks from this one on (negative counts from the end).
            tokens: the tokens, for loss with start_at_layer.
            attention_mask: [batch, pos], 1 real, 0 padding.
            stop_at_layer: run blocks before this one only and return the residual stream
                (negative counts from the end).
            past_kv_cache: a remotelens.past_key_value_caching.HookedTransformerKeyValueCache:
                the input is the positions after those it holds (kept in the server session);
                the output covers the new positions only, and the cache is extended unless
                frozen. Not with stop_at_layer, start_at_layer > 0 or backward hooks.
            shortformer_pos_embed: unsupported (must be None).

        Returns:
            Logits [batch, pos, d_vocab] (float32), the loss, Output(logits, loss), the residual
            stream (with stop_at_layer), or None. When backward hooks are registered and grad
            mode is on, logits, the residual and the mean loss come in a torch graph:
            metric(output).backward() runs the backward on the server and fires those hooks
            (TransformerLens's bwd hook idiom; forward hook functions run again for it).
        """
        return self._forward_impl(input, return_type=return_type, loss_per_token=loss_per_token,
                                  prepend_bos=prepend_bos, padding_side=padding_side,
                                  start_at_layer=start_at_layer, tokens=tokens,
                                  attention_mask=attention_mask, stop_at_layer=stop_at_layer,
                                  past_kv_cache=past_kv_cache,
                                  shortformer_pos_embed=shortformer_pos_embed,
                                  attach_backward=torch.is_grad_enabled() and self._has_backward_hooks())[0]

    def _layer_index(self, layer: Optional[int], what: str) -> Optional[int]:
        if layer is None:
            return None
        n = self.cfg.n_layers
        resolved = layer + n if layer < 0 else layer
        if not 0 <= resolved <= n:
            raise ValueError(f"{what}={layer} is out of range for {n} layers")
        return resolved

    def _forward_impl(self, input, return_type: Optional[str] = "logits",
                      loss_per_token: bool = False, prepend_bos: Optional[bool] = None,
                      padding_side: Optional[str] = None, start_at_layer: Optional[int] = None,
                      tokens: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None,
                      stop_at_layer: Optional[int] = None, past_kv_cache=None,
                      shortformer_pos_embed=None, cache_names: Sequence[str] = (),
                      pos_slice: Optional[Slice] = None, store: bool = False, download: bool = True,
                      readouts: Sequence["readouts_module.Readout"] = (),
                      backward: Optional[pb.BackwardRequest] = None, attach_backward: bool = False):
        """forward() plus caching and readouts; returns (model output, {name: tensor}, summary,
        [readout results]).

        With `backward`, the server also back-propagates its metric and the returned dict holds
        the gradients it selects as "<name>_grad" (with the backward ops registered here).
        With `attach_backward`, a logits, residual or mean-loss output is returned in a torch
        graph whose backward runs on the server (_ServerBackward)."""
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"Invalid return_type {return_type!r}; one of 'logits', 'loss', 'both', None")
        if past_kv_cache is not None:
            if not isinstance(past_kv_cache, HookedTransformerKeyValueCache):
                raise TypeError("past_kv_cache must be a remotelens HookedTransformerKeyValueCache "
                                "(HookedTransformerKeyValueCache.init_cache(model.cfg, device, batch_size)), "
                                f"got {type(past_kv_cache).__name__}")
            if attach_backward:
                raise ValueError("past_kv_cache does not combine with backward hooks: gradients need "
                                 "a forward over the whole sequence")
        if shortformer_pos_embed is not None:
            raise NotImplementedError("shortformer_pos_embed does not apply to Llama (rotary)")
        start = self._layer_index(start_at_layer, "start_at_layer")
        stop = self._layer_index(stop_at_layer, "stop_at_layer")
        request = pb.RunRequest()
        extra_ops: List[hooks_pb2.HookOp] = []
        first_hook = 0  # hooks and caches before this index in hook_dict cannot fire
        loss_tokens, mask = None, None
        if start is None:
            if isinstance(input, str) and attention_mask is None:
                request.texts.append(input)  # the server tokenizes: one round trip fewer
                request.prepend_bos = self._resolve_prepend_bos(prepend_bos)
            else:
                if isinstance(input, list) and input and all(isinstance(s, str) for s in input):
                    loss_tokens, mask = self._encode(input, prepend_bos, padding_side)
                    if bool(mask.all()):
                        mask = None
                else:
                    loss_tokens = self._as_tokens(input)
                    # Continuing a key/value cache: the new positions follow real tokens, so a
                    # token equal to the pad id is real (TransformerLens pads the first chunk only).
                    continuing = past_kv_cache is not None and past_kv_cache.handle is not None
                    mask = None if continuing else self._infer_attention_mask(loss_tokens)
                if attention_mask is not None:
                    mask = torch.as_tensor(attention_mask).to(torch.int64).cpu()
                request.tokens.CopyFrom(tensor_to_proto(loss_tokens))
        else:
            residual = torch.as_tensor(input)
            if residual.dim() != 3 or not residual.is_floating_point():
                raise ValueError("with start_at_layer, input must be the float residual stream "
                                 "[batch, pos, d_model]")
            mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(torch.int64).cpu()
            loss_tokens = None if tokens is None else self._as_tokens(tokens)
            if start > 0:
                request.residual.CopyFrom(tensor_to_proto(residual, float_only=True))
                request.start_at_layer = start
            else:
                # The server takes a residual only after block 0 (start_at_layer > 0): feed dummy
                # tokens and replace the embedding, which block 0 reads, with the residual.
                dummy = torch.zeros(residual.shape[:2], dtype=torch.int64)
                request.tokens.CopyFrom(tensor_to_proto(dummy))
                extra_ops.append(hooks_pb2.HookOp(
                    hook_name="hook_embed", set=hooks_pb2.SetOp(value=tensor_to_proto(residual, float_only=True))))
                first_hook = self._hook_index["hook_embed"] + 1  # TL skips the embedding's hooks
        if mask is not None:
            request.attention_mask.CopyFrom(tensor_to_proto(mask))
        if stop is not None:
            request.stop_at_layer = stop
        server_loss = start is None and stop is None and return_type in ("loss", "both")
        if stop is not None:
            request.return_type = pb.RETURN_TYPE_LOGITS
        elif return_type in ("loss", "both") and not server_loss:
            if loss_tokens is None:
                raise ValueError("tokens must be passed in if return_type is 'loss' or 'both' "
                                 "with start_at_layer")
            request.return_type = pb.RETURN_TYPE_LOGITS
        else:
            request.return_type = _RETURN_TYPES[return_type]
        request.loss_per_token = bool(loss_per_token)

        hooks = [(hp, fn) for hp, fn in self._active_hooks() if self._hook_index[hp.wire_name] >= first_hook]
        hook_ops, callbacks, needs_session = self._hook_ops(hooks)
        request.hooks.extend(extra_ops + hook_ops)
        names = [n for n in cache_names if self._hook_index[n] >= first_hook]
        server_slice = server_pos_slice(pos_slice)
        if names:
            request.cache.names.extend(names)
            request.cache.stream = bool(download)
            request.cache.store = bool(store)
            if server_slice is not None:
                if server_slice[0] is not None:
                    request.cache.pos_start = server_slice[0]
                if server_slice[1] is not None:
                    request.cache.pos_stop = server_slice[1]
        if backward is not None:
            request.backward.CopyFrom(backward)
            backward_ops, backward_callbacks = self._backward_ops(len(callbacks))
            request.hooks.extend(backward_ops)
            callbacks.update(backward_callbacks)
        request.readouts.extend(r.to_proto() for r in readouts)
        if past_kv_cache is not None:
            batch = (loss_tokens.shape[0] if loss_tokens is not None
                     else len(request.texts) if request.texts else torch.as_tensor(input).shape[0])
            request.past_kv_cache.CopyFrom(past_kv_cache._request(self, int(batch)))
        if store or needs_session or past_kv_cache is not None:
            request.session_id = self._open_session()
        expected = self._expected_bytes(request, names, loss_tokens)
        outputs, summary = self._execute(request, callbacks, expected)
        if past_kv_cache is not None:
            past_kv_cache._update(self, summary)

        cache = {n: outputs[n] for n in names if n in outputs}
        if backward is not None:
            cache.update({f"{n}_grad": outputs[f"{n}_grad"] for n in backward.cache.names
                          if f"{n}_grad" in outputs})
        readout_results = [r.decode(outputs, i) for i, r in enumerate(readouts)]
        if pos_slice is not None and server_slice is None:
            cache = {n: pos_slice.apply(t, dim=self._pos_dim_from_end(n)) for n, t in cache.items()}
        logits = outputs.get("logits")
        if stop is None and logits is not None and not (attach_backward and return_type == "logits"):
            logits = self._center_logits(logits, in_place=True)
        loss = outputs.get("loss")
        if return_type in ("loss", "both") and stop is None:
            if server_loss:
                if loss_per_token and mask is not None:
                    loss = loss * torch.logical_and(mask[:, :-1], mask[:, 1:])
            else:
                loss = lm_cross_entropy_loss(logits, loss_tokens, mask, per_token=loss_per_token)
        if stop is not None:
            out = self._to_device(logits)
        elif return_type == "logits":
            out = self._to_device(logits)
        elif return_type == "loss":
            out = self._to_device(loss)
        elif return_type == "both":
            out = Output(self._to_device(logits), self._to_device(loss))
        else:
            out = None
        if attach_backward and (stop is not None or return_type == "logits"
                                or (return_type == "loss" and server_loss and not loss_per_token)):
            out = self._attach_backward(out, request, callbacks, metric_is_loss=(
                stop is None and return_type == "loss"))
            if stop is None and return_type == "logits":
                # Centred after the graph node, so the server gets d/d(raw logits).
                out = self._center_logits(out)
        return out, cache, summary, readout_results

    def _attach_backward(self, out: torch.Tensor, request: pb.RunRequest,
                         callbacks: Dict[int, Tuple[Callable, HookPoint]], metric_is_loss: bool) -> torch.Tensor:
        """`out` in a torch graph: its backward sends d(value)/d(out) to the server, which re-runs
        this forward (same request, same hooks: forward hook functions run again) differentiably,
        back-propagates, and calls the backward hooks registered now."""
        backward_ops, backward_callbacks = self._backward_ops(len(callbacks))
        all_callbacks = {**callbacks, **backward_callbacks}

        def run_backward(grad: torch.Tensor) -> None:
            rerun = pb.RunRequest()
            rerun.CopyFrom(request)
            rerun.ClearField("cache")
            rerun.return_type = pb.RETURN_TYPE_NONE
            rerun.hooks.extend(backward_ops)
            if metric_is_loss:
                rerun.backward.loss.SetInParent()
                rerun.backward.metric_grad = float(grad)
            else:
                rerun.backward.output_grad.CopyFrom(tensor_to_proto(grad.detach().cpu(), float_only=True))
            self._execute(rerun, all_callbacks, None)

        anchor = torch.zeros((), requires_grad=True)  # gives the output a graph to live in
        return _ServerBackward.apply(anchor, out, run_backward)

    def _expected_bytes(self, request: pb.RunRequest, names: Sequence[str],
                        tokens: Optional[torch.Tensor]) -> Optional[int]:
        """Upper bound of the bytes the run streams back (for the progress bar), when known."""
        if tokens is None or not request.cache.stream:
            return None
        batch, pos = tokens.shape
        itemsize = torch.empty((), dtype=self.cfg.dtype).element_size()
        total = 0
        for name in names:
            numel = 1
            dims = list(self._wire_shapes[name])
            for i, d in enumerate(dims):
                numel *= batch if (d == -1 and i == 0) else (pos if d == -1 else d)
            total += numel * itemsize
        return total

    def _execute(self, request: pb.RunRequest, callbacks: Dict[int, Tuple[Callable, HookPoint]],
                 expected_bytes: Optional[int]) -> Tuple[Dict[str, torch.Tensor], pb.RunResponse.Summary]:
        """Runs `request` (Run, or RunInteractive when there are callbacks)."""
        return execute_run(self._stub, request, callbacks, self._call_kwargs(),
                           Progress(self.progress_bar_min_bytes, expected_bytes), self.cfg.device)

    # ------------------------------------------------------------------ caching

    def _cache_names(self, names_filter) -> List[str]:
        if names_filter is None:
            return self._firing_names()
        if isinstance(names_filter, str):
            names = [names_filter]
        elif isinstance(names_filter, (list, tuple, set, frozenset)):
            names = list(names_filter)
        elif callable(names_filter):
            return [n for n in self._firing_names() if names_filter(n)]
        else:
            raise ValueError("names_filter must be a string, list of strings, or function")
        unknown = [n for n in names if n not in self._hook_index]
        if unknown:
            raise ValueError(f"names_filter names {unknown}, which are not hook points of "
                             f"{self.cfg.model_name}; see model.hook_dict")
        return sorted(set(names), key=self._hook_index.__getitem__)

    def run_with_cache(self, *model_args, names_filter=None, device=None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False,
                       reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice=None, return_cache_object: bool = True, store: bool = False,
                       download: bool = True, metric=None, **model_kwargs):
        """forward() that also returns the activations selected by names_filter.

        Args:
            *model_args, **model_kwargs: forward()'s arguments.
            names_filter: None (every hook point; attn.hook_result only after
                set_use_attn_result(True)), a hook name, a list of names, or a function of a
                name (evaluated here over the hook names; the server gets the list).
            device: move the cached tensors there.
            remove_batch_dim: drop the batch dimension (for batch size 1).
            pos_slice: positions to keep (utils.Slice input; an int keeps the dimension).
                Contiguous slices are cut on the server; others after download.
            return_cache_object: ActivationCache (True) or a plain dict.
            store: also keep the cache on the server (cache.handle) so ops.patch_from(cache)
                patches without re-sending it.
            download: with store, False leaves the tensors on the server until first read.
            incl_bwd: also back-propagate the output, which must then be the scalar loss
                (return_type="loss", as torch's backward() needs), on the server, and add the
                gradient of every cached hook as "<name>_grad" (TransformerLens's names).
                Backward ops registered with dir="bwd" rewrite gradients on the way.
            metric: with incl_bwd, back-propagate this remotelens.metrics metric (computed on
                the server, e.g. metrics.logit_diff) instead of the loss; any return_type.
            reset_hooks_end, clear_contexts: accepted for TransformerLens compatibility.

        Returns:
            (model output, ActivationCache or dict).
        """
        if not download and not store:
            raise ValueError("download=False needs store=True (the tensors must be kept somewhere)")
        names = self._cache_names(names_filter)
        pos_slice = Slice.unwrap(pos_slice) if pos_slice is not None else None
        backward = None
        if metric is not None and not incl_bwd:
            raise ValueError("metric is what incl_bwd=True back-propagates; pass incl_bwd=True")
        if incl_bwd:
            if metric is None and (model_kwargs.get("return_type", "logits") != "loss"
                                   or model_kwargs.get("loss_per_token")):
                # What TransformerLens's out.backward() raises for a non-scalar output.
                raise RuntimeError("grad can be implicitly created only for scalar outputs: "
                                   "incl_bwd=True needs return_type='loss' (the mean loss)")
            if store:
                raise ValueError("incl_bwd=True streams gradients; store=True is not supported with it")
            backward = pb.BackwardRequest(cache=pb.CacheSelection(names=names, stream=True))
            if metric is None:
                backward.loss.SetInParent()
            elif isinstance(metric, metrics_module.LogitDiff):
                backward.logit_diff.CopyFrom(metric.to_proto())
            else:
                raise TypeError(f"metric must be a remotelens.metrics metric, got {type(metric).__name__}")
            server_slice = server_pos_slice(pos_slice)
            if server_slice is not None:
                if server_slice[0] is not None:
                    backward.cache.pos_start = server_slice[0]
                if server_slice[1] is not None:
                    backward.cache.pos_stop = server_slice[1]
        with self.hooks((), (), reset_hooks_end, clear_contexts):
            out, cache_dict, summary, _ = self._forward_impl(*model_args, cache_names=names,
                                                             pos_slice=pos_slice, store=store,
                                                             download=download, backward=backward,
                                                             **model_kwargs)
        handle = summary.cache_handle or None
        if store and not download:
            session_id = self._session_id
            client_slice = pos_slice if server_pos_slice(pos_slice) is None else None
            cache_dict = _RemoteTensors(names, lambda wanted: self._fetch_cache(
                session_id, handle, wanted, client_slice))
        if device is not None or remove_batch_dim or self.cfg.device != "cpu":
            target = device if device is not None else self.cfg.device
            if isinstance(cache_dict, _RemoteTensors):
                cache_dict.fetch_all()
                cache_dict = dict(cache_dict._have)
            cache_dict = {n: (t[0] if remove_batch_dim else t).to(target) for n, t in cache_dict.items()}
        if not return_cache_object:
            return out, cache_dict
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim,
                                    handle=handle, session_id=self._session_id if handle else None)

    def run_with_readouts(self, *model_args, readouts: Sequence["readouts_module.Readout"],
                          fwd_hooks: Sequence = (), **model_kwargs):
        """forward() that also computes readouts and reductions on the server (one round trip,
        a small answer): logit lens top-k or logits, norms, means (see remotelens.readouts).

        Args:
            *model_args, **model_kwargs: forward()'s arguments (return_type=None skips the
                logits download when only the readouts are wanted).
            readouts: remotelens.readouts.lens(...), norm(...), mean(...); each sees its hooks'
                activations after the active hooks (ops, Python hooks) have run there.
            fwd_hooks: hooks added for this call only, as run_with_hooks.

        Returns:
            (model output, [one result per readout, in order]): a float32 tensor, or a
            readouts.LensTopK(values, indices) for a lens with top_k.

        Raises:
            ValueError: a bad hook name, top_k or position (the server's INVALID_ARGUMENT,
                naming what is valid).
        """
        for r in readouts:
            if not isinstance(r, readouts_module.Readout):
                raise TypeError(f"readouts must be remotelens.readouts.lens/norm/mean, got {r!r}")
        with self.hooks(fwd_hooks):
            out, _, _, results = self._forward_impl(*model_args, readouts=readouts, **model_kwargs)
        return out, results

    def _fetch_cache(self, session_id: str, handle: str, names: Sequence[str],
                     pos_slice: Optional[Slice] = None) -> Dict[str, torch.Tensor]:
        """Downloads activations of a stored cache."""
        assembler = ChunkAssembler()
        out: Dict[str, torch.Tensor] = {}
        progress = Progress(self.progress_bar_min_bytes, None)
        call = self._stub.FetchCache(pb.FetchCacheRequest(session_id=session_id, cache_handle=handle,
                                                          names=list(names)), **self._call_kwargs())
        try:
            for chunk in call:
                progress.update(len(chunk.data))
                done = assembler.add(chunk)
                if done is not None:
                    out[done[0]] = done[1]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()
            progress.close()
        if pos_slice is not None:
            out = {n: pos_slice.apply(t, dim=self._pos_dim_from_end(n)) for n, t in out.items()}
        return {n: self._to_device(t) for n, t in out.items()}

    def _delete_cache(self, session_id: str, handle: str) -> int:
        return int(self._unary("DeleteCache", pb.DeleteCacheRequest(
            session_id=session_id, cache_handle=handle)).freed_bytes)

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy (utils.lm_cross_entropy_loss)."""
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)
