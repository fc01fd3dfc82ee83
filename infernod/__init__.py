"""Inferno daemon package: the wire protocol, the client library and the daemon itself.

Importing this package (or ``infernod.protocol`` / ``infernod.client``) must stay cheap: no
llama_cpp, onnxruntime, textual or pynvml imports at module level.
"""

__version__ = "0.1.0"
