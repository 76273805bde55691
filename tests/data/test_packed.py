"""Strings packed into numpy arrays (lilt_ds/data/packed.py)."""

import pytest

from lilt_ds.data.packed import PackedStrings


def test_round_trip_including_unicode_and_empty_strings():
    strings = ["a", "", "café ☕", "x" * 1000]
    packed = PackedStrings(strings)
    assert len(packed) == 4 and list(packed) == strings and packed[-1] == strings[-1]
    with pytest.raises(IndexError):
        packed[4]
    assert list(PackedStrings([])) == []
