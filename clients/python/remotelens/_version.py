"""The client's package version, the wire API version it speaks, and the check on connect.

pyproject.toml reads __version__ from this file, so the installed distribution and
remotelens.__version__ cannot disagree. API_VERSION comes from the proto the stubs were
generated from (enum ApiVersion in remotelens.proto), the same constant the server reports.
"""

from .errors import IncompatibleServerError
from .v1 import remotelens_pb2 as pb

__version__ = "0.1.0"

# The wire API this client speaks: ApiVersion.API_VERSION_CURRENT of its proto.
API_VERSION: int = pb.API_VERSION_CURRENT


def check_api_version(info: pb.ModelInfo, address: str, client_api_version: int = API_VERSION) -> None:
    """Raises IncompatibleServerError unless the server speaks `client_api_version`.

    Args:
        info: the server's GetModelInfo answer.
        address: where the server is, for the message.
        client_api_version: the version to require (tests pass others).
    """
    server = int(info.api_version)
    if server == client_api_version:
        return
    if server == pb.API_VERSION_UNSPECIFIED:
        server_says = ("reports no API version (it predates ModelInfo.api_version, so it speaks "
                       "version 0)")
    else:
        server_says = f"speaks wire API version {server}"
    if server < client_api_version:
        fix = (f"upgrade the server to a release that speaks version {client_api_version}, or "
               f"install the client from the server's own release (pip install clients/python "
               f"in the server's checkout)")
    else:
        fix = (f"install the client from the server's release (pip install clients/python in "
               f"the server's checkout), which speaks version {server}")
    raise IncompatibleServerError(
        f"remotelens client {__version__} speaks wire API version {client_api_version}, but the "
        f"server at {address or '(unknown address)'} {server_says}: {fix}.",
        client_api_version=client_api_version, server_api_version=server)
