"""User-facing errors: printed as one line by the CLI, exit code 2, no traceback.

Errors quote the user's values, and a value can be huge (a 100,000-item list, a string read from
a data file): `quote` renders one in at most QUOTE_LIMIT characters, and every error message is
cut to MESSAGE_LIMIT characters where it is made (FactmemError), so no message is ever longer
than about a kilobyte whatever it quotes."""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_LIMIT = 200  # characters of one quoted value
MESSAGE_LIMIT = 1000  # characters of a whole error line (its start and its end are kept)

# reprlib stops building the repr once these counts are reached, so a deeply nested or huge
# value costs no more than its first few items to quote.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 6
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT
_REPR.maxlong = 40


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` of at most about `limit` characters (`[1, 2, 3, 4, 5, 6, 7, 8, ...]`,
    `'aaaa...aaaa'`), for quoting a user's value in an error."""
    return shorten(_REPR.repr(value), limit)


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to about `limit` characters in its middle, saying how much was left out."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 5, limit * 2 // 5
    return f"{text[:head]}...[{len(text) - head - tail:,} characters cut]...{text[-tail:]}"


class FactmemError(Exception):
    """A problem with the user's input (config, data file, model name). The message is the whole
    story: it names the file, line, field or key and what would be valid."""

    def __init__(self, message: str = "") -> None:
        super().__init__(shorten(str(message), MESSAGE_LIMIT))


class ConfigError(FactmemError):
    pass


class DataError(FactmemError):
    pass


class ModelError(FactmemError):
    pass
