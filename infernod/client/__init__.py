"""The client library: everything a script, the CLI or the TUI needs.

    from infernod.client import Client

``drivers`` holds :class:`Client` and :class:`AsyncClient` (sockets and waiting), ``base``
the request methods both share, ``core`` the protocol logic without I/O, ``stream`` token
streams, ``config`` where a client connects. Importing this package stays cheap.
"""

from infernod.client.core import api_key
from infernod.client.drivers import (
                                     AsyncClient,
                                     AsyncStream,
                                     Client,
                                     ClientCore,
                                     CurveKeys,
                                     DaemonUnavailable,
                                     Event,
                                     InfernoError,
                                     Notice,
                                     Stream,
                                     decode_array,
                                     encode_array,
)

__all__ = ["AsyncClient", "AsyncStream", "Client", "ClientCore", "CurveKeys",
           "DaemonUnavailable", "Event", "InfernoError", "Notice", "Stream", "decode_array",
           "api_key", "encode_array"]
