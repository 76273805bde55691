"""Strings packed into numpy arrays (lilt_ds/data/index/packed.py)."""

import numpy as np
import pytest

from lilt_ds.data.index.packed import PackedPaths, PackedPathsBuilder, PackedStrings


def test_round_trip_including_unicode_and_empty_strings():
    strings = ["a", "", "café ☕", "x" * 1000]
    packed = PackedStrings(strings)
    assert len(packed) == 4 and list(packed) == strings and packed[-1] == strings[-1]
    with pytest.raises(IndexError):
        packed[4]
    assert list(PackedStrings([])) == []


def test_slice_decodes_a_range_at_once_ascii_or_not():
    strings = [f"/data/{k}.jpg" for k in range(50)]
    packed = PackedStrings(strings)
    assert packed.slice(0, 50) == strings and packed.slice(10, 13) == strings[10:13]
    assert packed.slice(48, 100) == strings[48:] and packed.slice(5, 5) == []
    mixed = ["a", "", "café", "☕☕", "z"]
    assert PackedStrings(mixed).slice(1, 5) == mixed[1:5]


def test_paths_store_each_folder_once():
    paths = [f"/data/cc3m/{k % 3}/{k:08d}.jpg" for k in range(30)] + ["relative.jpg", "/root.jpg", "/dir/"]
    builder = PackedPathsBuilder()
    for path in paths:
        builder.append(path)
    arrays = builder.arrays("path")
    stored = PackedPaths(arrays, "path")
    assert [stored[i] for i in range(len(paths))] == paths and stored.slice(0, len(paths)) == paths
    assert len(PackedStrings.from_arrays(arrays, "path_folder")) == 6  # 3 + "", "/", "/dir/"
    assert arrays["path_folder_of"].dtype == np.uint32 and arrays["path_name_ends"].dtype == np.uint32
