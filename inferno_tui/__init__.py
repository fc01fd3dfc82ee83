"""inferno-tui: the Textual operations console for infernod.

Talks to the daemon only through ``infernod.client`` (never imports backend code).
"""
