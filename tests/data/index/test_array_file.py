"""NumPy arrays in one memory-mapped file (lilt_ds/data/index/array_file.py)."""

import pickle

import numpy as np
import pytest

from lilt_ds.data.index.array_file import ArrayFile, ArrayFileError, write_array_file


def test_round_trip_of_arrays_and_meta(tmp_path):
    arrays = {
        "ends": np.array([3, 5, 9], dtype=np.uint32),
        "bytes": np.frombuffer(b"abcdefghi", np.uint8),
        "empty": np.zeros(0, dtype=np.int64),
        "wide": np.arange(5, dtype=np.int64) * 2**40,
    }
    path = str(tmp_path / "a.arrays")
    write_array_file(path, arrays, {"built_from": ["x.json"]})
    opened = ArrayFile(path)
    assert opened.meta == {"built_from": ["x.json"]}
    for name, values in arrays.items():
        assert opened.arrays[name].dtype == values.dtype and np.array_equal(opened.arrays[name], values)
    assert not opened.arrays["ends"].flags.writeable  # a view of the read-only mapping
    opened.touch_all_pages()
    assert list(tmp_path.iterdir()) == [tmp_path / "a.arrays"]  # no temporary file left behind


def test_pickles_as_its_path(tmp_path):
    path = str(tmp_path / "big.arrays")
    write_array_file(path, {"values": np.arange(100_000, dtype=np.int64)}, {})
    data = pickle.dumps(ArrayFile(path))
    assert len(data) < 1000
    assert np.array_equal(pickle.loads(data).arrays["values"], np.arange(100_000))


@pytest.mark.parametrize("damage", ["truncate", "foreign", "empty"])
def test_damaged_files_are_rejected(tmp_path, damage):
    path = tmp_path / "a.arrays"
    write_array_file(str(path), {"values": np.arange(1000, dtype=np.int64)}, {})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "foreign": b"[1, 2, 3]" * 20, "empty": b""}[damage])
    with pytest.raises(ArrayFileError):
        ArrayFile(str(path))
