"""The pretraining dataset: samples, caption draws, bad images (lilt_ds/data/caption_dataset.py)."""

import logging

import pytest
import torch
from torch.utils.data import DataLoader

from lilt_ds.data import (
    CaptionDataset,
    DataError,
    ImageTextCollator,
    ResumableDistributedSampler,
    build_train_transform,
    load_caption_files,
)

from .files import MEAN, STD, write_image, write_json


def make_dataset(path, **kwargs):
    transform = build_train_transform(32, MEAN, STD)
    return CaptionDataset(load_caption_files([path]), transform, **kwargs)


def test_loader_yields_image_tensors_and_token_ids(caption_file, tokenizer):
    dataset = make_dataset(caption_file(8))
    loader = DataLoader(
        dataset,
        batch_size=4,
        sampler=ResumableDistributedSampler(len(dataset)),
        collate_fn=ImageTextCollator(tokenizer, max_length=25),
    )
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts == [f"caption {i} a!" for i in batch["index"].tolist()]


def test_list_captions_are_drawn_per_epoch_deterministically(caption_file):
    path = caption_file(10, captions_per_entry=4)
    dataset, again = make_dataset(path, seed=3), make_dataset(path, seed=3)
    epoch0 = [dataset.caption(0, i) for i in range(10)]
    epoch1 = [dataset.caption(1, i) for i in range(10)]
    assert epoch0 == [again.caption(0, i) for i in range(10)]
    assert epoch0 != epoch1
    assert epoch0 != [make_dataset(path, seed=4).caption(0, i) for i in range(10)]
    assert {dataset.caption(e, 0) for e in range(30)} == {f"Caption 0 {c}!" for c in "abcd"}
    assert dataset[(1, 5)]["caption"] == epoch1[5]


def test_augmentation_depends_on_the_sample_only(caption_file):
    dataset = make_dataset(caption_file(3))
    torch.manual_seed(0)
    first = dataset[(2, 1)]["image"]
    torch.manual_seed(123)
    assert torch.equal(dataset[(2, 1)]["image"], first)
    assert not torch.equal(dataset[(3, 1)]["image"], first)


def test_samples_do_not_depend_on_the_number_of_workers(caption_file, tokenizer):
    dataset = make_dataset(caption_file(8, captions_per_entry=3))

    def batches(workers):
        sampler = ResumableDistributedSampler(len(dataset), seed=1)
        sampler.set_epoch(2)
        loader = DataLoader(
            dataset,
            batch_size=4,
            sampler=sampler,
            num_workers=workers,
            collate_fn=ImageTextCollator(tokenizer, max_length=25),
        )
        return list(loader)

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])


def entries_with_bad_images(tmp_path, good=10, missing=(), corrupt=()):
    entries = [{"image": write_image(tmp_path / f"{i}.jpg"), "caption": f"c{i}"} for i in range(good)]
    for i in missing:
        entries[i]["image"] = str(tmp_path / f"missing{i}.jpg")
    for i in corrupt:
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    return write_json(tmp_path / "train.json", entries)


def test_missing_image_with_error_policy_names_file_entry_path_and_fix(tmp_path):
    path = entries_with_bad_images(tmp_path, missing=[4])
    with pytest.raises(DataError) as err:
        make_dataset(path)
    message = str(err.value)
    assert message.startswith("1 of 10 images are missing:")
    assert f"{path}, entry 4: image {tmp_path / 'missing4.jpg'}: file not found" in message
    assert "data.on_bad_sample=skip" in message


def test_unreadable_image_with_error_policy_stops_at_read(tmp_path):
    path = entries_with_bad_images(tmp_path, corrupt=[2])
    dataset = make_dataset(path)
    with pytest.raises(DataError, match=rf"{path}, entry 2: image .*2\.jpg: cannot decode: UnidentifiedImageError"):
        dataset[2]


def test_skip_replaces_deterministically_and_reports(tmp_path, caplog):
    path = entries_with_bad_images(tmp_path, good=20, missing=[3], corrupt=[7])
    with caplog.at_level(logging.WARNING, logger="lilt_ds.data"):
        dataset = make_dataset(path, on_bad_sample="skip", max_bad_fraction=0.2)
    assert "1 of 20 images are missing" in caplog.text and "missing3.jpg" in caplog.text
    assert dataset.bad_samples.count == 1
    for bad in (3, 7):
        sample = dataset[(0, bad)]
        assert sample["index"] not in (3, 7)
        assert sample["bad_samples"][0].index == bad
        assert make_dataset(path, on_bad_sample="skip", max_bad_fraction=0.2)[(0, bad)]["index"] == sample["index"]


def test_skip_threshold_aborts_at_load(tmp_path):
    path = entries_with_bad_images(tmp_path, good=10, missing=[1, 2])
    with pytest.raises(
        DataError,
        match=r"2 of 10 entries \(20\.00%\) have a missing or unreadable image .*"
        r"more than data\.max_bad_fraction = 0\.1",
    ):
        make_dataset(path, on_bad_sample="skip", max_bad_fraction=0.1)


def test_bad_policy_value_is_rejected(caption_file):
    with pytest.raises(DataError, match=r"data\.on_bad_sample = 'ignore'; choose one of \['error', 'skip'\]"):
        make_dataset(caption_file(2), on_bad_sample="ignore")
