"""The caption index cached in a memory-mapped file beside the JSON, and its fingerprint
(lilt_ds/data/index_cache.py, lilt_ds/data/captions.py)."""

import functools
import gc
import json
import logging
import os
import pickle

import pytest

from lilt_ds.data import DataError, load_caption_files, pre_caption

from ..files import write_image, write_json

CLEAN = functools.partial(pre_caption, max_words=30)


def cache_files(folder):
    return sorted(p.name for p in folder.rglob("*.lilt-caption-index"))


def contents(table):
    return [(table.image_path(i), table.captions(i)) for i in range(len(table))]


def test_built_once_beside_the_json_then_mapped(caption_file, tmp_path, caplog):
    path = caption_file(5, captions_per_entry=2)
    with caplog.at_level(logging.INFO, logger="lilt_ds.data"):
        first = load_caption_files([path], clean=CLEAN)
    assert os.path.dirname(first.mapped_file) == str(tmp_path) and "cached in" in caplog.text
    caplog.clear()
    built_at = os.stat(first.mapped_file).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lilt_ds.data"):
        second = load_caption_files([path], clean=CLEAN)
    assert second.mapped_file == first.mapped_file and caplog.text == ""
    assert os.stat(second.mapped_file).st_mtime_ns == built_at
    assert contents(second) == contents(first)
    assert second.captions(4) == ["caption 4 a", "caption 4 b"] and second.locate(3) == (path, 3)


@pytest.mark.parametrize(
    "edit, reason",
    [
        ("longer", r"changed size from \d+ to \d+ bytes"),
        ("same_size", r"has other content"),
    ],
)
def test_an_index_of_other_source_files_is_detected_and_rebuilt(tmp_path, caplog, edit, reason):
    image = write_image(tmp_path / "a.jpg")
    path = write_json(tmp_path / "train.json", [{"image": image, "caption": "old words"}])
    cache = load_caption_files([path]).mapped_file
    stat = os.stat(path)
    caption = "new words, more of them" if edit == "longer" else "new words"
    write_json(tmp_path / "train.json", [{"image": image, "caption": caption}])
    if edit == "same_size":
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a copy that kept size and mtime
    with caplog.at_level(logging.WARNING, logger="lilt_ds.data"):
        table = load_caption_files([path])
    assert table.caption(0) == caption and table.mapped_file == cache
    assert f"{cache}: cache built from other source files" in caplog.text
    assert "rebuilding it" in caplog.text and reason.split(" ")[0] in caplog.text


def test_a_damaged_cache_is_rebuilt(caption_file, caplog):
    path = caption_file(4)
    cache = load_caption_files([path]).mapped_file
    with open(cache, "r+b") as handle:
        handle.truncate(100)
    with caplog.at_level(logging.WARNING, logger="lilt_ds.data"):
        table = load_caption_files([path])
    assert len(table) == 4 and "unreadable cache" in caplog.text


def test_unwritable_json_folder_falls_back_to_the_lilt_ds_cache(caption_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LILT_DS_CACHE", str(tmp_path / "cache"))
    path = caption_file(3)
    beside = load_caption_files([path], cache=None)  # no file: the name to block comes next
    assert beside.mapped_file is None and cache_files(tmp_path) == []
    blocked = load_caption_files([path]).mapped_file
    os.unlink(blocked)
    os.mkdir(blocked)  # where the cache would go beside the JSON, nothing can be written
    table = load_caption_files([path])
    assert table.mapped_file.startswith(str(tmp_path / "cache" / "caption-index"))
    assert load_caption_files([path]).mapped_file == table.mapped_file
    assert contents(table) == contents(beside)


def test_each_cleaning_setting_and_image_root_gets_its_own_cache(tmp_path):
    write_image(tmp_path / "root" / "a.jpg")
    write_image(tmp_path / "other" / "a.jpg")
    path = write_json(tmp_path / "t.json", [{"image": "a.jpg", "caption": "One Two Three!"}])
    root = str(tmp_path / "root")
    two = load_caption_files([path], root, clean=functools.partial(pre_caption, max_words=2))
    three = load_caption_files([path], root, clean=functools.partial(pre_caption, max_words=3))
    other = load_caption_files([path], str(tmp_path / "other"), clean=functools.partial(pre_caption, max_words=3))
    assert (two.caption(0), three.caption(0)) == ("one two", "one two three")
    assert other.image_path(0) == str(tmp_path / "other" / "a.jpg")
    assert len(cache_files(tmp_path)) == 3


def test_a_cleaning_function_that_cannot_be_identified_is_not_cached(caption_file, tmp_path):
    table = load_caption_files([caption_file(3)], clean=lambda text: text.upper())
    assert table.mapped_file is None and table.caption(1) == "CAPTION 1 A!"
    assert cache_files(tmp_path) == []


def test_a_mapped_table_pickles_as_its_file_name(caption_file):
    table = load_caption_files([caption_file(200, captions_per_entry=2)], clean=CLEAN)
    data = pickle.dumps(table)
    assert len(data) < 2000
    assert contents(pickle.loads(data)) == contents(table)


def test_the_table_holds_no_python_object_per_entry(tmp_path):
    image = write_image(tmp_path / "a.jpg")
    entries = [{"image": f"{tmp_path}/img/{k % 7}/{k}.jpg", "caption": [f"c {k}", f"d {k}"]} for k in range(20_000)]
    entries[0]["image"] = image
    path = write_json(tmp_path / "t.json", entries)
    load_caption_files([path])  # build the cache
    gc.collect()
    objects = len(gc.get_objects())
    table = load_caption_files([path])
    gc.collect()
    assert len(gc.get_objects()) - objects < 100
    assert (
        table.image_path(19_999) == f"{tmp_path}/img/{19_999 % 7}/19999.jpg" and table.caption(19_999, 1) == "d 19999"
    )


def test_many_invalid_entries_are_all_counted(tmp_path):
    path = write_json(tmp_path / "t.json", [{"image": "rel.jpg", "caption": ""} for _ in range(5000)])
    with pytest.raises(DataError) as err:
        load_caption_files([path])
    assert str(err.value).startswith("10000 invalid entries") and "... and 9990 more" in str(err.value)
    assert cache_files(tmp_path) == []


def test_index_of_several_files_is_one_cache(caption_file, tmp_path):
    first, second = caption_file(3, name="a.json"), caption_file(2, name="b.json")
    table = load_caption_files([first, second])
    assert cache_files(tmp_path) == [os.path.basename(table.mapped_file)]
    assert os.path.basename(table.mapped_file).startswith("a.json.")
    assert table.locate(4) == (second, 1)
    json.loads(open(first).read())  # the sources are untouched


@pytest.mark.parametrize("setting", ["folder", None])
def test_the_loader_follows_data_index_cache(caption_file, tmp_path, tokenizer, setting):
    from lilt_ds.data import build_train_loader

    from ..files import MEAN, STD

    folder = tmp_path / "index"
    cfg = {
        "train_files": [caption_file(8)],
        "num_workers": 0,
        "index_cache": str(folder) if setting == "folder" else None,
    }
    dataset = build_train_loader(
        cfg, tokenizer, 32, MEAN, STD, rank=0, world_size=1, micro_batch_size=4, seed=0
    ).dataset
    if setting is None:
        assert dataset.table.mapped_file is None and cache_files(tmp_path) == []
    else:
        assert os.path.dirname(dataset.table.mapped_file) == str(folder) and len(cache_files(tmp_path)) == 1
