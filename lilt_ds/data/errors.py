"""The one exception type for bad data input, so callers can tell user mistakes from bugs, and
the formatting of the lists such errors carry."""

from typing import List


class DataError(ValueError):
    """Bad data input: the message names the file, the entry and the fix."""


def format_list(lines: List[str], limit: int = 10) -> str:
    """Indented lines for an error message: the first `limit`, then how many more."""
    shown = "".join(f"\n  {line}" for line in lines[:limit])
    return shown[1:] + (f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else "")
