"""Python exceptions for the server's gRPC status codes.

Every error the server reports arrives as a subclass of :class:`RemoteLensError` that also
subclasses the built-in exception a Python user would expect, so both of these work:

    try:
        model.run_with_cache(tokens, names_filter="blocks.99.hook_resid_post")
    except ValueError as e:          # INVALID_ARGUMENT is a ValueError ...
        print(e)                     # ... whose message is the server's own explanation
    except remotelens.RemoteLensError as e:
        print(e.code, e.details)

Mapping (gRPC code -> exception class -> built-in base):

    INVALID_ARGUMENT    InvalidArgumentError     ValueError
    OUT_OF_RANGE        OutOfRangeError          ValueError  (a too-long sequence is a bad value,
                                                              not an index into a container)
    NOT_FOUND           NotFoundError            KeyError    (str() is the plain message)
    PERMISSION_DENIED   PermissionDeniedError    PermissionError
    UNAUTHENTICATED     UnauthenticatedError     PermissionError
    DEADLINE_EXCEEDED   DeadlineExceededError    TimeoutError
    UNAVAILABLE         UnavailableError         ConnectionError
    RESOURCE_EXHAUSTED  ResourceExhaustedError   RuntimeError
    CANCELLED           CancelledError           RuntimeError
    FAILED_PRECONDITION FailedPreconditionError  RuntimeError
    ABORTED             AbortedError             RuntimeError  (a past_kv_cache another run extended first)
    anything else       RemoteLensError          RuntimeError
"""

import contextlib
from typing import Dict, Iterator, Optional, Type

import grpc

__all__ = [
    "RemoteLensError",
    "InvalidArgumentError",
    "OutOfRangeError",
    "NotFoundError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "DeadlineExceededError",
    "UnavailableError",
    "ResourceExhaustedError",
    "CancelledError",
    "FailedPreconditionError",
    "AbortedError",
    "IncompatibleServerError",
    "from_rpc_error",
    "translate_rpc_errors",
]


class RemoteLensError(RuntimeError):
    """Base class of every error reported by a remotelens server.

    Attributes:
        code: the grpc.StatusCode the server returned (None for client-side protocol errors).
        details: the server's message, unchanged.
    """

    code: Optional[grpc.StatusCode] = None
    details: str = ""


class InvalidArgumentError(RemoteLensError, ValueError):
    """A bad hook name, shape, dtype, selector, token id or option value (INVALID_ARGUMENT)."""


class OutOfRangeError(RemoteLensError, ValueError):
    """The sequence is longer than the model's n_ctx (OUT_OF_RANGE)."""


class NotFoundError(RemoteLensError, KeyError):
    """An unknown or expired session, hook id or cache handle (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PermissionDeniedError(RemoteLensError, PermissionError):
    """A session, hook or cache that belongs to another user (PERMISSION_DENIED)."""


class UnauthenticatedError(RemoteLensError, PermissionError):
    """A missing or wrong API key (UNAUTHENTICATED)."""


class DeadlineExceededError(RemoteLensError, TimeoutError):
    """The call's deadline passed while queued or running (DEADLINE_EXCEEDED)."""


class UnavailableError(RemoteLensError, ConnectionError):
    """The server is unreachable, loading, or shutting down (UNAVAILABLE)."""


class ResourceExhaustedError(RemoteLensError):
    """The queue is full, a quota was exceeded, or the device ran out of memory."""


class CancelledError(RemoteLensError):
    """The call was cancelled (CANCELLED)."""


class FailedPreconditionError(RemoteLensError):
    """The request cannot run in the server's current state (FAILED_PRECONDITION)."""


class AbortedError(RemoteLensError):
    """ABORTED: a past_kv_cache run lost to another run that extended the same cache first."""


class IncompatibleServerError(RemoteLensError):
    """The server speaks another wire API version than this client (raised by from_server).

    A client-side check, so code is None. Attributes: client_api_version, server_api_version.
    """

    def __init__(self, message: str, client_api_version: int, server_api_version: int):
        super().__init__(message)
        self.details = message
        self.client_api_version = client_api_version
        self.server_api_version = server_api_version


_BY_CODE: Dict[grpc.StatusCode, Type[RemoteLensError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
}


def from_rpc_error(error: grpc.RpcError) -> RemoteLensError:
    """Converts a grpc.RpcError into the matching RemoteLensError subclass.

    Args:
        error: an error raised by a gRPC call or while iterating its response stream.

    Returns:
        The exception to raise; its message is the server's message, or the code's name when
        the server sent none.
    """
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    cls = _BY_CODE.get(code, RemoteLensError)
    message = details or (code.name if code is not None else str(error))
    # Constructed with the message only: OSError-based classes would read a second positional
    # argument as (errno, strerror).
    exc = cls(message)
    exc.code = code
    exc.details = details
    return exc


@contextlib.contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """Re-raises grpc.RpcError raised inside the block as RemoteLensError subclasses."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from e
