"""The wire contract: codec, request schemas and error codes. No heavy imports here."""

from infernod.protocol.errors import CODES, DaemonUnavailable, InfernoError

__all__ = ["CODES", "DaemonUnavailable", "InfernoError"]
