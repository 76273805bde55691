"""Streaming a JSON list of entries in constant memory (lilt_ds/data/index/jsonfile.py)."""

import json

import pytest

from lilt_ds.data import DataError
from lilt_ds.data.index import jsonfile
from lilt_ds.data.index.jsonfile import iter_json_list


@pytest.fixture
def tiny_window(monkeypatch):
    """A read size and lookahead of a few characters, so that every entry, string, delimiter and
    multi-byte character straddles a refill of the window."""
    monkeypatch.setattr(jsonfile, "_CHUNK_BYTES", 3)
    monkeypatch.setattr(jsonfile, "_LOOKAHEAD", 2)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        " [ ]\n",
        '[{"a": 1}]',
        '[ {"a": 1} ,\n {"b": [1, 2, {"c": "d"}]} ]\n\n',
        '[{"caption": "café ☕ \\u00e9 \\"quoted\\" ]},"}]',
        '[\n {"image": "/a.jpg", "caption": "x"},\n {"image": \n',  # truncated download
        '[{"a": 1},]',
        '[{"a": 1}] trailing',
        '[{"a": 1} {"b": 2}]',
        '[{"a": 1}',
        "[",
        "",
        '[{"a": "line\nbreak"}]',
        '[{"a": 1},\n\n   {"b":',
    ],
)
def test_entries_and_errors_match_the_json_module(tmp_path, tiny_window, text):
    path = tmp_path / "f.json"
    path.write_text(text, encoding="utf-8")
    try:
        expected = json.loads(text)
    except json.JSONDecodeError as err:
        with pytest.raises(
            DataError,
            match=rf"f\.json: not valid JSON: {err.msg}.* at line {err.lineno}, "
            rf"column {err.colno}\. Fix the file there",
        ):
            list(iter_json_list(str(path), "data.train_files"))
        return
    assert list(iter_json_list(str(path), "data.train_files")) == expected


def test_a_long_file_streams_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonfile, "_CHUNK_BYTES", 1000)
    monkeypatch.setattr(jsonfile, "_LOOKAHEAD", 100)
    entries = [{"image": f"/i/{k}.jpg", "caption": "w" * (k % 300)} for k in range(2000)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(entries, indent=2))
    assert list(iter_json_list(str(path), "s")) == entries


def test_not_utf8_names_the_byte(tmp_path, tiny_window):
    data = b'[{"caption": "ok"}, {"caption": "caf' + b"\xe9" + b'"}]'
    path = tmp_path / "latin1.json"
    path.write_bytes(data)
    position = data.index(b"\xe9")
    with pytest.raises(
        DataError,
        match=rf"latin1\.json: not UTF-8 text \(invalid continuation byte at "
        rf"byte {position}\); save the file as UTF-8 JSON",
    ):
        list(iter_json_list(str(path), "s"))


def test_an_entry_that_is_not_an_object_stops_there(tmp_path, tiny_window):
    path = tmp_path / "mixed.json"
    path.write_text('[{"a": 1}, {"b": 2}, ["c"]]')
    entries = iter_json_list(str(path), "s")
    assert next(entries) == {"a": 1} and next(entries) == {"b": 2}
    with pytest.raises(DataError, match=r"mixed\.json: entry 2 is a JSON list, expected an object"):
        next(entries)


def test_a_leading_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_text('\ufeff[{"a": 1}]', encoding="utf-8")
    assert list(iter_json_list(str(path), "s")) == [{"a": 1}]
