"""One forward pass on the wire: Run, or RunInteractive when Python hooks must be called back.

RunInteractive is bidirectional: the first message is the RunRequest; the server then streams
activations and results, and at each client-callback hook sends a HookCall followed by the
activation's chunks, waiting for exactly one HookReply (in order) before it continues. Here the
response stream is read on the calling thread; replies go to the request stream through a queue
that gRPC drains on its own thread.
"""

import queue
from typing import Any, Callable, Dict, Optional, Tuple

import grpc
import numpy as np
import torch
import tqdm

from ._hooks import HookPoint
from ._wire import ChunkAssembler, tensor_to_proto
from .errors import from_rpc_error
from .utils import Slice
from .v1 import remotelens_pb2 as pb

Callbacks = Dict[int, Tuple[Callable, HookPoint]]
# Sites whose position dimension is third from last ([batch, pos, heads, d]).
_POS_DIM_3 = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result",
              "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def execute_run(stub, request: pb.RunRequest, callbacks: Callbacks, call_kwargs: Dict[str, Any],
                progress: "Progress", device: str = "cpu"
                ) -> Tuple[Dict[str, torch.Tensor], pb.RunResponse.Summary]:
    """Runs `request` and collects every streamed tensor by name, answering hook calls.

    Args:
        stub: the RemoteLensStub.
        request: the run.
        callbacks: callback_id -> (hook function, its HookPoint); non-empty means RunInteractive.
        call_kwargs: metadata and timeout for the call.
        progress: counts downloaded bytes.
        device: where hook functions get their activations.

    Returns:
        ({name: tensor} in arrival order, the run's Summary).
    """
    outputs: Dict[str, torch.Tensor] = {}
    summary = pb.RunResponse.Summary()
    assembler = ChunkAssembler()
    replies: "queue.Queue[Optional[pb.InteractiveRequest]]" = queue.Queue()
    pending_call: Optional[pb.HookCall] = None
    if callbacks:
        def requests():
            yield pb.InteractiveRequest(run=request)
            while True:
                item = replies.get()
                if item is None:
                    return
                yield item
        call = stub.RunInteractive(requests(), **call_kwargs)
    else:
        call = stub.Run(request, **call_kwargs)
    try:
        for response in call:
            kind = response.WhichOneof("item")
            if kind == "tensor":
                progress.update(len(response.tensor.data))
                done = assembler.add(response.tensor)
                if done is None:
                    continue
                if pending_call is not None:
                    replies.put(pb.InteractiveRequest(
                        reply=answer_hook_call(pending_call, done[1], callbacks, device)))
                    pending_call = None
                else:
                    outputs[done[0]] = done[1]
            elif kind == "hook_call":
                pending_call = response.hook_call
            elif kind == "summary":
                summary = response.summary
    except grpc.RpcError as e:
        raise from_rpc_error(e) from e
    finally:
        replies.put(None)  # ends the request stream (and unblocks gRPC's reader of it)
        call.cancel()      # no-op after a clean finish; stops the server after an exception here
        progress.close()
    return outputs, summary


def pos_dim(name: str) -> int:
    """The position dimension of a hook's activation, counted from the end."""
    base = name[:-len("_grad")] if name.endswith("_grad") else name  # a gradient: its hook
    return -3 if base.rsplit(".", 1)[-1] in _POS_DIM_3 else -2


def server_pos_slice(pos_slice: Optional[Slice]) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """(start, stop) when the server can cut pos_slice itself, else None."""
    if pos_slice is None or pos_slice.mode == "identity":
        return None
    if pos_slice.mode == "slice":
        s = pos_slice.slice
        if s.step not in (None, 1):
            return None
        return s.start, s.stop
    if pos_slice.mode == "array":
        idx = np.asarray(pos_slice.slice).reshape(-1)
        if idx.size == 1 and np.issubdtype(idx.dtype, np.integer):
            i = int(idx[0])
            return i, (None if i == -1 else i + 1)
    return None


def answer_hook_call(call: pb.HookCall, activation: torch.Tensor, callbacks: Callbacks,
                     device: str = "cpu") -> pb.HookReply:
    """Runs the Python hook the server called back and builds the reply.

    The hook gets the activation on `device` (the model's cfg.device) as fn(activation, hook=hp).
    It may return a replacement of the same shape, or return None after editing the activation in
    place (detected through the tensor's version counter) or leaving it alone ("unchanged").
    """
    try:
        fn, hook_point = callbacks[call.callback_id]
    except KeyError:
        raise RuntimeError(f"the server called unknown callback {call.callback_id}") from None
    if str(device) != "cpu":
        activation = activation.to(device)
    version = activation._version
    result = fn(activation, hook=hook_point)
    if result is None:
        if activation._version == version:
            return pb.HookReply(call_id=call.call_id, unchanged=True)
        result = activation  # edited in place
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"hook function for {call.hook_name} returned {type(result).__name__}; "
                        f"return a tensor or None")
    if tuple(result.shape) != tuple(activation.shape):
        raise ValueError(f"hook function for {call.hook_name} returned shape "
                         f"{list(result.shape)}; the activation has shape {list(activation.shape)}")
    return pb.HookReply(call_id=call.call_id, replacement=tensor_to_proto(result, float_only=True))


class Progress:
    """A byte-counting tqdm bar that appears once a download is known to pass `threshold` bytes.

    Args:
        threshold: minimum size for a bar; None: never show one.
        expected: the download's size when known up front (else the bar appears once `threshold`
            bytes have arrived).
        desc: the bar's label.
    """

    def __init__(self, threshold: Optional[int], expected: Optional[int], desc: str = "activations"):
        self._threshold = threshold
        self._expected = expected
        self._desc = desc
        self._seen = 0
        self._bar = None

    def set_total(self, total: int) -> None:
        """Tells the size once known (e.g. from the first chunk of a single tensor)."""
        if self._expected is None:
            self._expected = total

    def update(self, n: int) -> None:
        self._seen += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self._threshold is None:
            return
        big = (self._expected >= self._threshold if self._expected is not None
               else self._seen >= self._threshold)
        if big:
            self._bar = tqdm.tqdm(total=self._expected, unit="B", unit_scale=True,
                                  desc=self._desc, initial=self._seen)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
