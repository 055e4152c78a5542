"""User-facing errors.

`TinyzqError` carries a one-line message that names the file/option and what was expected.
The CLI catches it and prints ``error: <msg>`` with exit status 2 (no traceback).
"""


class TinyzqError(Exception):
    """A user-facing error with a one-line message (no traceback is shown for it)."""

    def __init__(self, msg: str = ""):
        # keep messages one line: collapse any embedded newlines
        msg = " ".join(str(msg).split("\n")).strip()
        super().__init__(msg)


__all__ = ["TinyzqError"]
