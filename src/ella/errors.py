"""Errors the package raises on purpose: each carries one actionable message for the user.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class EllaError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class MissingModelError(EllaError):
    """A model (base, ELLA weights or LLM) that is neither on disk nor reachable on the Hub."""
