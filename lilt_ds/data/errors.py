"""The one exception type for bad data input, so callers can tell user mistakes from bugs, and
the formatting of the lists such errors carry."""

from ..errors import LiltError


class DataError(LiltError, ValueError):
    """Bad data input: the message names the file, the entry and the fix."""


def format_list(lines: list[str], limit: int = 10, total: int | None = None) -> str:
    """Indented lines for an error message: the first `limit`, then how many more (of `total`,
    when the caller kept only the first lines of a longer list)."""
    total = len(lines) if total is None else total
    shown = "".join(f"\n  {line}" for line in lines[:limit])
    return shown[1:] + (f"\n  ... and {total - limit} more" if total > limit else "")
