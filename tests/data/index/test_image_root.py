"""Resolving image paths against data.image_root (lilt_ds/data/index/image_root.py)."""

import pytest

from lilt_ds.data import DataError, ImageRoot, load_caption_files

from ..files import write_image, write_json


def test_no_root_keeps_absolute_paths_and_rejects_relative_ones():
    root = ImageRoot(None)
    assert root.resolve("/data/a.jpg") == "/data/a.jpg"
    assert root.resolve("a.jpg") is None


def test_string_root_joins_relative_paths_only():
    root = ImageRoot("/mnt/coco")
    assert root.resolve("train2014/a.jpg") == "/mnt/coco/train2014/a.jpg"
    assert root.resolve("/elsewhere/a.jpg") == "/elsewhere/a.jpg"


def test_prefix_rewrite_replaces_whole_path_components():
    root = ImageRoot({"from": "/old/data/", "to": "/new"})
    assert root.resolve("/old/data/cc3m/a.jpg") == "/new/cc3m/a.jpg"
    assert root.resolve("/old/database/a.jpg") == "/old/database/a.jpg"  # not a component match
    assert root.resolve("/other/a.jpg") == "/other/a.jpg"
    assert root.resolve("cc3m/a.jpg") is None
    assert ImageRoot({"from": "/", "to": "/mnt"}).resolve("/a/b.jpg") == "/mnt/a/b.jpg"


@pytest.mark.parametrize("spec", [{"from": "/a"}, {"from": "/a", "to": ""}, {"src": "/a", "to": "/b"}, 3, ""])
def test_invalid_spec_is_rejected(spec):
    with pytest.raises(DataError, match=r"data\.image_root"):
        ImageRoot(spec)


def test_prefix_rewrite_on_a_downloaded_file(tmp_path):
    image = write_image(tmp_path / "new" / "cc3m" / "a.jpg")
    path = write_json(tmp_path / "train.json", [{"image": "/export/home/user/cc3m/a.jpg", "caption": "x"}])
    table = load_caption_files([path], image_root={"from": "/export/home/user", "to": str(tmp_path / "new")})
    assert table.image_path(0) == image and table.missing_images() == []


def test_relative_path_with_prefix_rewrite_explains_the_fix(tmp_path):
    path = write_json(tmp_path / "train.json", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(
        DataError, match=r"entry 0: .*a prefix rewrite in data\.image_root only applies to absolute paths"
    ):
        load_caption_files([path], image_root={"from": "/a", "to": "/b"})
