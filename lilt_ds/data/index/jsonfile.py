"""Reading a JSON annotation file whose top level must be a list of objects, with errors that point
at the file, the line and column, or the entry.

`iter_json_list` streams the entries in constant memory (a window of the text, each entry parsed
by the C scanner of the standard `json` module), so a file of millions of entries never exists
as one list of Python dicts.
"""

import codecs
import json
import os
import re
from collections.abc import Iterator

from ..errors import DataError

_CHUNK_BYTES = 4 << 20  # read size
_LOOKAHEAD = 1 << 20  # text kept ahead of the parse position before an entry is parsed
_LONGEST_ENTRY = 64 << 20  # an entry that does not parse with this much text is malformed
_SPACE = re.compile(r"[ \t\n\r]*")
_DELIMITER = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")
_BOM = "\ufeff"


def iter_json_list(path: str, setting: str) -> Iterator[dict]:
    """Yield the entries (objects) of the list stored in `path`, one at a time. Raises DataError
    for a missing file, text that is not UTF-8 JSON, a top level that is not a list, or an entry
    that is not an object."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (given in {setting}). Fix the path in {setting}.")
    with open(path, "rb") as handle:
        text = _TextWindow(handle, path)
        text.fill()
        if text.buf.startswith(_BOM):
            text.pos = 1
        if text.skip_space() != "[":
            _raise_top_level_error(path, text)
        text.pos += 1
        decode = json.JSONDecoder().raw_decode
        number = 0
        if text.skip_space() == "]":
            text.pos += 1
        else:  # entries, each followed by "," or the closing "]"
            while True:
                entry = text.parse(decode)
                if not isinstance(entry, dict):
                    raise DataError(
                        f"{path}: entry {number} is a JSON {json_type_name(entry)}, expected an object "
                        '{"image": ..., "caption": ...}. Fix that entry.'
                    )
                yield entry
                number += 1
                if text.delimiter() == "]":
                    break
        if text.skip_space() != "":
            text.fail("Extra data")


def json_type_name(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


class _TextWindow:
    """The decoded text around the parse position, refilled from the file as the parse advances,
    with the line and column of its first character for error messages."""

    def __init__(self, handle, path: str):
        self.handle = handle
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.bytes_read = 0
        self.line = 1  # of buf[0]
        self.column = 1  # of buf[0]

    def fill(self) -> bool:
        """Drop the consumed text and append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        consumed = self.buf[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.line += newlines
            self.column = len(consumed) - consumed.rfind("\n")
        else:
            self.column += len(consumed)
        chunk = self.handle.read(_CHUNK_BYTES)
        pending = len(self.decoder.getstate()[0])
        try:
            added = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{self.path}: not UTF-8 text ({err.reason} at byte "
                f"{self.bytes_read - pending + err.start}); save the file as UTF-8 JSON."
            ) from None
        self.bytes_read += len(chunk)
        self.eof = not chunk
        self.buf = self.buf[self.pos :] + added
        self.pos = 0
        return not self.eof

    def skip_space(self) -> str:
        """Move past whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    def delimiter(self) -> str:
        """Move past the "," or "]" after an entry and the whitespace around it; return it."""
        found = _DELIMITER.match(self.buf, self.pos)
        if found is not None and found.end() < len(self.buf):  # the fast path: all in the window
            self.pos = found.end()
            return found.group(1)
        char = self.skip_space()
        if char not in (",", "]"):
            self.fail("Expecting ',' delimiter")
        self.pos += 1
        if char == ",":
            self.skip_space()
        return char

    def parse(self, decode):
        """The JSON value at the parse position (read further into the file for a value longer
        than what is buffered)."""
        while len(self.buf) - self.pos < _LOOKAHEAD and self.fill():
            pass
        while True:
            try:
                value, self.pos = decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as err:
                if len(self.buf) - self.pos > _LONGEST_ENTRY or not self.fill():
                    self.fail(err.msg, err.pos)

    def fail(self, message: str, pos: int = None) -> None:
        pos = self.pos if pos is None else pos
        before = self.buf[:pos]
        newlines = before.count("\n")
        line = self.line + newlines
        column = pos - before.rfind("\n") if newlines else self.column + pos
        raise DataError(
            f"{self.path}: not valid JSON: {message} at line {line}, column {column}. "
            "Fix the file there (an interrupted download often truncates it)."
        )


def _raise_top_level_error(path: str, text: _TextWindow) -> None:
    """The top level is not a list: parse the whole value for the exact error."""
    while text.fill():
        pass
    try:
        value = json.loads(text.buf)
    except json.JSONDecodeError as err:
        text.fail(err.msg, err.pos)
    raise DataError(
        f"{path}: the top level is a JSON {json_type_name(value)}, expected a list of entries "
        '[{"image": ..., "caption": ...}, ...]. Wrap the entries in a list.'
    )
