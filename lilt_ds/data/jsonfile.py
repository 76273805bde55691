"""Reading a JSON annotation file whose top level must be a list of objects, with errors that point
at the file, the line and column, or the entry."""

import json
import os

from .errors import DataError


def read_json_list(path: str, setting: str) -> list:
    """Return the list stored in `path`; `setting` names the config key that listed the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (given in {setting}). Fix the path in {setting}.")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
            "Fix the file there (an interrupted download often truncates it)."
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8 JSON.") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: the top level is a JSON {json_type_name(data)}, expected a list of entries "
            '[{"image": ..., "caption": ...}, ...]. Wrap the entries in a list.'
        )
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: entry {index} is a JSON {json_type_name(entry)}, expected an object "
                '{"image": ..., "caption": ...}. Fix that entry.'
            )
    return data


def json_type_name(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
