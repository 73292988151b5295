"""spa's own error types: what a user gave spa was wrong (data, checkpoint, configuration, a file).

The ``spa`` command prints these on one line (``spa VERB: error: ...``, exit code 2) instead of a
traceback; ``SPA_DEBUG=1`` or ``spa --debug`` shows the traceback. Each is also a ``ValueError`` or
``RuntimeError``, so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SpaError", "SpaWarning"]


class SpaError(Exception):
    """Base of the errors caused by user input (not by a bug in spa)."""


class SpaWarning(UserWarning):
    """What spa repaired or assumed in what a user gave it (dropped boxes, data without a split, a partial
    weight file...). The ``spa`` command prints these on one line (``spa VERB: warning: ...``); other libraries'
    warnings print as Python prints them. ``warnings.filterwarnings("ignore", category=SpaWarning)`` hides them.
    """


class ConfigError(SpaError, ValueError):
    """A run configuration (flags, YAML file, Python values) that cannot work."""
