"""User-facing errors.

A `UserError` means the input is wrong (recipe, data, paths, arguments). The CLI turns it
into one `error: ...` line on stderr and exit status 2, with no traceback unless
`--debug` or `RLHF_DEBUG=1` is set. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: the message says what is wrong and where (file, line, key)."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
