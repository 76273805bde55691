"""Building the training loader and eval data from the config section (lilt_ds/data/loader.py)."""

import pytest
import torch

from lilt_ds.data import DataError, build_eval_data, build_train_loader
from lilt_ds.errors import LiltError

from .files import MEAN, STD, write_image, write_json


def build(data_cfg, tokenizer, rank=0, world_size=1, batch=4, seed=0):
    cfg = {"num_workers": 0, **data_cfg}
    loader = build_train_loader(
        cfg,
        tokenizer,
        image_size=32,
        mean=MEAN,
        std=STD,
        rank=rank,
        world_size=world_size,
        micro_batch_size=batch,
        seed=seed,
    )
    return loader, loader.dataset, loader.sampler


def test_batches_from_original_format_files(caption_file, tokenizer):
    files = [caption_file(6, name="a.json"), caption_file(5, captions_per_entry=2, name="b.json")]
    loader, dataset, sampler = build({"train_files": files}, tokenizer)
    assert len(dataset) == 11 and len(loader) == loader.batches_per_epoch == 2  # drop_last
    batches = list(loader)
    assert set(batches[0]) == {"images", "input_ids", "attention_mask", "index"}
    assert batches[0]["images"].shape == (4, 3, 32, 32)
    texts = tokenizer.batch_decode(batches[0]["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("caption ") and "!" not in t for t in texts)  # cleaned
    assert batches[0]["input_ids"].shape[1] <= 25


def test_resume_mid_epoch_replays_the_same_batches(caption_file, tokenizer):
    cfg = {"train_files": [caption_file(20, captions_per_entry=3)], "num_workers": 1}
    loader, _, sampler = build(cfg, tokenizer, rank=1, world_size=2, batch=2, seed=4)
    loader.set_epoch(1)
    reference = list(loader)
    assert len(reference) == 5
    loader.set_epoch(1)
    for step, _ in enumerate(loader):
        if step == 1:
            state = sampler.state_dict()
            break
    assert (state["epoch"], state["consumed"]) == (1, 4)
    resumed, _, resumed_sampler = build(cfg, tokenizer, rank=1, world_size=2, batch=2, seed=4)
    resumed_sampler.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == 3
    for ours, theirs in zip(rest, reference[2:]):
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    assert resumed_sampler.state_dict()["epoch"] == 2


def test_skipped_samples_are_counted_in_the_main_process(tmp_path, tokenizer):
    entries = [{"image": write_image(tmp_path / f"{i}.jpg"), "caption": f"c{i}"} for i in range(16)]
    (tmp_path / "3.jpg").write_bytes(b"broken")
    entries[5]["image"] = str(tmp_path / "gone.jpg")
    cfg = {
        "train_files": [write_json(tmp_path / "t.json", entries)],
        "on_bad_sample": "skip",
        "max_bad_fraction": 0.2,
        "num_workers": 2,
    }
    loader, dataset, _ = build(cfg, tokenizer)
    batches = list(loader)
    served = torch.cat([b["index"] for b in batches]).tolist()
    assert len(served) == 16 and 3 not in served and 5 not in served
    assert (dataset.bad_samples.count, dataset.bad_samples.replaced) == (2, 2)


def test_skip_aborts_during_training_above_the_threshold(tmp_path, tokenizer):
    entries = [{"image": write_image(tmp_path / f"{i}.jpg"), "caption": f"c{i}"} for i in range(8)]
    for i in (1, 2):
        (tmp_path / f"{i}.jpg").write_bytes(b"broken")
    cfg = {"train_files": [write_json(tmp_path / "t.json", entries)], "on_bad_sample": "skip", "max_bad_fraction": 0.15}
    loader, _, _ = build(cfg, tokenizer)
    with pytest.raises(DataError, match=r"2 of 8 entries \(25\.00%\) .*0 missing, 2 unreadable"):
        list(loader)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"on_bad_sample": "drop"}, r"data\.on_bad_sample = 'drop': expected one of error, skip"),
        ({"max_bad_fraction": 2}, r"data\.max_bad_fraction = 2: expected a number >= 0 and <= 1"),
        ({"train_file": ["a.json"]}, r"unknown config key 'data\.train_file'.*Closest valid keys: data\.train_files"),
        ({"demo": {"count": 3}}, r"unknown config key 'data\.demo\.count'"),
        ({"num_workers": -1}, r"data\.num_workers = -1: expected auto or an integer >= 0"),
        ({"augment": {"hflip": "yes"}}, r"data\.augment\.hflip = 'yes': expected true or false"),
        (
            {"augment": {"randaugment": "rand-m7-x"}},
            r"data\.augment\.randaugment = 'rand-m7-x' is not a RandAugment string",
        ),
        (
            {"image_root": ["/a"]},
            r"data\.image_root = \['/a'\]: expected a folder, \{from: \"/old\", to: \"/new\"\}, or null",
        ),
        ({"image_root": {"from": "/a"}}, r"data\.image_root = \{'from': '/a'\}: a prefix rewrite needs exactly two"),
    ],
)
def test_bad_settings_are_rejected(cfg, message, caption_file, tokenizer):
    with pytest.raises(LiltError, match=message):
        build({"train_files": [caption_file(4)], **cfg}, tokenizer)


def test_batch_larger_than_a_shard_is_rejected(caption_file, tokenizer):
    with pytest.raises(
        DataError,
        match=r"each of the 2 ranks gets 3 of the 6 training samples per epoch, "
        r"fewer than the micro batch size 4",
    ):
        build({"train_files": [caption_file(6)]}, tokenizer, world_size=2)


def test_no_train_files_trains_on_the_demo_and_evaluates_on_its_split(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LILT_DS_CACHE", str(tmp_path / "cache"))
    cfg = {"demo": {"n": 24, "eval_n": 6, "seed": 1, "size": 48}}
    loader, dataset, _ = build(cfg, tokenizer, batch=8)
    assert len(dataset) == 24 and next(iter(loader))["images"].shape == (8, 3, 32, 32)
    assert (tmp_path / "cache" / "demo-24-1-eval6-48px" / "train.json").is_file()
    evaluation = build_eval_data(cfg, tokenizer, 32, MEAN, STD)
    assert len(evaluation.images) == 6 and len(evaluation.texts) == 24


def test_eval_data_from_an_eval_file_or_none(caption_file, tmp_path, tokenizer):
    train = caption_file(4)
    assert build_eval_data({"train_files": [train]}, tokenizer, 32, MEAN, STD) is None
    write_image(tmp_path / "val" / "x.jpg")
    eval_file = write_json(tmp_path / "val.json", [{"image": "x.jpg", "caption": ["A b.", "C d"]}])
    cfg = {"train_files": [train], "eval_file": eval_file, "eval_image_root": str(tmp_path / "val")}
    assert build_eval_data(cfg, tokenizer, 32, MEAN, STD).texts == ["a b", "c d"]


def test_the_configured_augmentation_is_the_loaders(caption_file, tokenizer):
    loader, dataset, _ = build(
        {"train_files": [caption_file(4)], "augment": {"preset": "openclip", "scale": [0.7, 0.9], "grayscale": 0.5}},
        tokenizer,
    )
    crop, grey, _ = dataset.transform.transforms
    assert crop.scale == [0.7, 0.9] and grey.p == 0.5
    assert next(iter(loader))["images"].shape == (4, 3, 32, 32)
