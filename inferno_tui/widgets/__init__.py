"""Widgets: each renders an immutable snapshot handed to it (``show(...)``)."""
