"""Retrieval evaluation data in the original format (lilt_ds/data/evaluation/retrieval.py)."""

import pytest
import torch

from lilt_ds.data import DataError, build_retrieval_data

from ..files import MEAN, STD, write_image, write_json


def write_retrieval_set(tmp_path):
    entries = [
        {"image": "a.jpg", "caption": ["A red cat.", "The cat, red!"]},
        {"image": "sub/b.jpg", "caption": "one blue dog"},
        {"image": "c.jpg", "caption": ["x", "y", "z"]},
    ]
    for entry in entries:
        write_image(tmp_path / "imgs" / entry["image"], size=50)
    return write_json(tmp_path / "test.json", entries)


def test_maps_texts_and_batches(tmp_path, tokenizer):
    path = write_retrieval_set(tmp_path)
    data = build_retrieval_data(path, str(tmp_path / "imgs"), tokenizer, 32, MEAN, STD)
    assert data.texts == ["a red cat", "the cat red", "one blue dog", "x", "y", "z"]
    assert data.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert data.txt2img == [0, 0, 1, 2, 2, 2]
    images = list(data.image_loader(batch_size=2))
    assert images[0]["images"].shape == (2, 3, 32, 32) and images[1]["index"].tolist() == [2]
    texts = list(data.text_batches(batch_size=4))
    assert [b["index"].tolist() for b in texts] == [[0, 1, 2, 3], [4, 5]]
    assert texts[0]["input_ids"].dtype == torch.long
    assert tokenizer.decode(texts[0]["input_ids"][2], skip_special_tokens=True) == "one blue dog"


def test_eval_transform_is_deterministic(tmp_path, tokenizer):
    data = build_retrieval_data(write_retrieval_set(tmp_path), str(tmp_path / "imgs"), tokenizer, 32, MEAN, STD)
    assert torch.equal(data.images[0]["image"], data.images[0]["image"])


def test_relative_paths_need_the_eval_image_root(tmp_path, tokenizer):
    with pytest.raises(
        DataError, match=r"test\.json, entry 0: relative image path 'a\.jpg' .*set data\.eval_image_root"
    ):
        build_retrieval_data(write_retrieval_set(tmp_path), None, tokenizer, 32, MEAN, STD)


def test_missing_eval_images_are_an_error(tmp_path, tokenizer):
    path = write_retrieval_set(tmp_path)
    (tmp_path / "imgs" / "sub" / "b.jpg").unlink()
    with pytest.raises(
        DataError,
        match=r"1 of 3 evaluation images are missing:\n  .*test\.json, entry 1: image .*sub/b\.jpg: file not found",
    ):
        build_retrieval_data(path, str(tmp_path / "imgs"), tokenizer, 32, MEAN, STD)


def test_unreadable_eval_image_names_entry(tmp_path, tokenizer):
    path = write_retrieval_set(tmp_path)
    (tmp_path / "imgs" / "c.jpg").write_bytes(b"garbage")
    data = build_retrieval_data(path, str(tmp_path / "imgs"), tokenizer, 32, MEAN, STD)
    with pytest.raises(DataError, match=r"test\.json, entry 2: image .*c\.jpg: cannot decode"):
        data.images[2]
