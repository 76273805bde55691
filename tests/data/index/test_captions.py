"""Reading and validating pretraining caption files (lilt_ds/data/index/captions.py)."""

import functools

import pytest

from lilt_ds.data import DataError, load_caption_files, pre_caption

from ..files import write_image, write_json


def test_files_are_concatenated_and_entries_located(caption_file):
    first, second = caption_file(3, name="a.json"), caption_file(2, captions_per_entry=3, name="b.json")
    table = load_caption_files([first, second])
    assert len(table) == 5
    assert table.caption(0) == "Caption 0 a!"
    assert table.num_captions(3) == 3 and table.caption(3, 2) == "Caption 0 c!"
    assert table.locate(1) == (first, 1)
    assert table.locate(4) == (second, 1)
    assert table.image_path(4).endswith("b.json_1.jpg")


def test_cleaning_is_applied_to_stored_captions(caption_file):
    table = load_caption_files([caption_file(2)], clean=functools.partial(pre_caption, max_words=2))
    assert table.caption(1) == "caption 1"


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"image": "/a.jpg", "caption": "x"},\n {"image": \n')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON: .* at line 4, column 1"):
        load_caption_files([str(path)])


def test_missing_file_names_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found \(given in data\.train_files\)"):
        load_caption_files([str(tmp_path / "nope.json")])


def test_top_level_must_be_a_list(tmp_path):
    path = write_json(tmp_path / "dict.json", {"image": "/a.jpg", "caption": "x"})
    with pytest.raises(DataError, match=r"dict\.json: the top level is a JSON object, expected a list"):
        load_caption_files([path])


def test_entries_must_be_objects(tmp_path):
    path = write_json(tmp_path / "strings.json", [{"image": "/a.jpg", "caption": "x"}, "b.jpg"])
    with pytest.raises(DataError, match=r"strings\.json: entry 1 is a JSON string, expected an object"):
        load_caption_files([path])


def test_empty_file_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"empty\.json: holds an empty list"):
        load_caption_files([write_json(tmp_path / "empty.json", [])])


def test_no_files_is_rejected():
    with pytest.raises(DataError, match=r"data\.train_files is empty"):
        load_caption_files([])


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"caption": "x"}, r"entry 1: missing key 'image' \(the entry has keys: caption\)"),
        ({"image": "/a.jpg"}, r"entry 1: missing key 'caption' \(the entry has keys: image\)"),
        ({"image": "/a.jpg", "caption": "   "}, r"entry 1: caption is empty"),
        ({"image": "/a.jpg", "caption": []}, r"entry 1: 'caption' is an empty list"),
        ({"image": "/a.jpg", "caption": ["ok", ""]}, r"entry 1: caption 1 is empty"),
        ({"image": "/a.jpg", "caption": ["ok", 3]}, r"entry 1: caption 1 is a number, expected a string"),
        ({"image": "/a.jpg", "caption": {"en": "x"}}, r"entry 1: 'caption' must be a string or a list"),
        ({"image": "", "caption": "x"}, r"entry 1: 'image' must be a non-empty path string"),
        (
            {"image": "rel/a.jpg", "caption": "x"},
            r"entry 1: relative image path 'rel/a\.jpg' and no image root .* set data\.image_root",
        ),
    ],
)
def test_invalid_entry_names_file_entry_and_fix(tmp_path, entry, message):
    path = write_json(tmp_path / "train.json", [{"image": "/ok.jpg", "caption": "fine"}, entry])
    with pytest.raises(DataError, match=r"1 invalid entries in data\.train_files:\n  .*train\.json, " + message):
        load_caption_files([path])


def test_caption_empty_after_cleaning_is_rejected(tmp_path):
    path = write_json(tmp_path / "train.json", [{"image": "/a.jpg", "caption": "?!..."}])
    with pytest.raises(DataError, match=r"entry 0: caption '\?!\.\.\.' is empty after cleaning"):
        load_caption_files([path], clean=pre_caption)


def test_all_invalid_entries_are_listed_at_once(tmp_path):
    entries = [{"image": f"rel/{i}.jpg", "caption": "x"} for i in range(13)]
    path = write_json(tmp_path / "train.json", entries)
    with pytest.raises(DataError) as err:
        load_caption_files([path])
    message = str(err.value)
    assert message.startswith("13 invalid entries")
    assert "entry 9:" in message and "entry 10:" not in message and "... and 3 more" in message


def test_relative_paths_resolve_against_a_root(tmp_path):
    write_image(tmp_path / "root" / "sub" / "a.jpg")
    path = write_json(tmp_path / "train.json", [{"image": "sub/a.jpg", "caption": "x"}])
    table = load_caption_files([path], image_root=str(tmp_path / "root"))
    assert table.image_path(0) == str(tmp_path / "root" / "sub" / "a.jpg")
    assert table.missing_images() == []


def test_missing_images_are_reported_with_their_entry(tmp_path):
    path = write_json(
        tmp_path / "train.json",
        [
            {"image": write_image(tmp_path / "a.jpg"), "caption": "x"},
            {"image": str(tmp_path / "gone.jpg"), "caption": "y"},
        ],
    )
    [missing] = load_caption_files([path]).missing_images()
    assert (missing.index, missing.file, missing.entry) == (1, path, 1)
    assert missing.describe() == f"{path}, entry 1: image {tmp_path / 'gone.jpg'}: file not found"
