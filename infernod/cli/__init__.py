"""`inferno`: the command line for people and scripts (``main`` is the entry point).

``main`` builds the parser and dispatches; each family of commands lives in its own module
(``jobs``, ``keys``, ``doctor``, ``onnx``, ``telemetry``) and registers its subcommands.
"""

from infernod.cli.app import main

__all__ = ["main"]
