"""One error type for everything a user can fix.

Stages raise `KubetrainError` for bad input or settings; the CLI prints its
message as one line (`error: ...`) and exits non-zero instead of a traceback.
The message must name the problem and the fix.
"""

from __future__ import annotations


class KubetrainError(ValueError):
    """A problem the user can fix; the message says what and how."""

    #: How a failed task's traceback ends ("kubetrain.core.errors.KubetrainError: ...");
    #: the local runner surfaces that one line instead of the whole traceback.
    LOG_PREFIX = "KubetrainError: "

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def require(condition: bool, message: str) -> None:
    """Raise `KubetrainError(message)` unless `condition` holds."""
    if not condition:
        raise KubetrainError(message)
