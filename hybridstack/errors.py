"""The one exception type users see.

Every problem a user can fix (bad config, missing file, malformed data) is raised as
:class:`HybridstackError` with a one-line message that names the problem and the fix.
The CLI prints it as a single ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations


class HybridstackError(Exception):
    """A user-fixable problem; ``str(err)`` is the one line shown to the user."""


def one_line(message: str) -> str:
    """Collapse a message to one line (tracebacks and pandas errors span several)."""
    return " ".join(str(message).split())
