"""remotelens: TransformerLens's HookedTransformer API for a model resident on a remotelens server.

    from remotelens import HookedTransformer, ops, utils
    model = HookedTransformer.from_server("127.0.0.1:50051", api_key=...)
    logits, cache = model.run_with_cache("Hello world")

Porting a TransformerLens notebook: replace HookedTransformer.from_pretrained(...) with
HookedTransformer.from_server(...); `from transformer_lens import utils` may become
`from remotelens import utils`. A TransformerLens 4 notebook replaces
TransformerBridge.boot_transformers(...) with TransformerBridge.from_server(...).
"""

from . import metrics, ops, past_key_value_caching, patching, readouts, utils
from .activation_cache import ActivationCache
from .config import HookedTransformerConfig
from .factored_matrix import FactoredMatrix
from .errors import (AbortedError, CancelledError, DeadlineExceededError, FailedPreconditionError,
                     IncompatibleServerError, InvalidArgumentError, NotFoundError,
                     OutOfRangeError, PermissionDeniedError, RemoteLensError,
                     ResourceExhaustedError, UnauthenticatedError, UnavailableError)
from ._hooks import HookPoint, HookPointInfo
from ._version import API_VERSION, __version__
from .hooked_transformer import HookedTransformer, Output
from .past_key_value_caching import HookedTransformerKeyValueCache
from .transformer_bridge import TransformerBridge
from .utils import get_act_name

__all__ = [
    "HookedTransformer", "TransformerBridge", "HookedTransformerConfig", "ActivationCache", "HookPoint", "HookPointInfo", "Output",
    "HookedTransformerKeyValueCache", "past_key_value_caching",
    "FactoredMatrix", "metrics", "ops", "patching", "readouts", "utils", "get_act_name",
    "RemoteLensError", "InvalidArgumentError", "OutOfRangeError", "NotFoundError",
    "PermissionDeniedError", "UnauthenticatedError", "DeadlineExceededError", "UnavailableError",
    "ResourceExhaustedError", "CancelledError", "FailedPreconditionError", "AbortedError",
    "IncompatibleServerError", "API_VERSION", "__version__",
]
