"""One exception type for every user-facing failure.

The CLI prints ``HarnessError`` as a single ``error: ...`` line and exits with
status 2; anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """A bad input or environment: the message says what, where and how to fix it."""
