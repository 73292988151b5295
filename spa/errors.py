"""spa's own error types: what a user gave spa was wrong (data, checkpoint, configuration, a file).

The ``spa`` command prints these on one line (``spa VERB: error: ...``, exit code 2) instead of a
traceback; ``SPA_DEBUG=1`` or ``spa --debug`` shows the traceback. Each is also a ``ValueError`` or
``RuntimeError``, so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SpaError"]


class SpaError(Exception):
    """Base of the errors caused by user input (not by a bug in spa)."""


class ConfigError(SpaError, ValueError):
    """A run configuration (flags, YAML file, Python values) that cannot work."""
