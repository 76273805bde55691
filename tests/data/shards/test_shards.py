"""Tar shards in the WebDataset layout: the converter, reading for training across ranks and
workers, resuming, and damaged input (lilt_ds/data/shards/)."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lilt_ds.cli.make_shards import main as make_shards
from lilt_ds.data import DataError, ResumableDistributedSampler, build_train_loader, find_shards, write_shards
from lilt_ds.data.shards.files import count_shards, scan_tar
from lilt_ds.errors import LiltError

from ..files import MEAN, STD, write_image, write_json

pytest.importorskip("webdataset", reason="needs the shards extra: pip install -e .[test]")


def build(data_cfg, tokenizer, rank=0, world_size=1, batch=4, seed=0):
    cfg = {"num_workers": 0, "augment": {"randaugment": False}, **data_cfg}
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


def samples_of(loader):
    """{index: (image, caption tokens without padding)} over one pass, and the batch count."""
    found, batches = {}, 0
    for batch in loader:
        batches += 1
        assert set(batch) == {"images", "input_ids", "attention_mask", "index"}
        for index, image, ids, mask in zip(
            batch["index"].tolist(), batch["images"], batch["input_ids"], batch["attention_mask"]
        ):
            assert index not in found, f"sample {index} twice in one epoch"
            found[index] = (image, ids[mask.bool()].tolist())
    return found, batches


@pytest.fixture
def shards(tmp_path):
    """`make(n, shard_size, captions_per_entry)`: a caption JSON of n entries whose images are
    noise (so that every crop differs), entry i captioned "Caption i a!", "Caption i b!", ...,
    and its shards; returns (json path, brace pattern)."""

    def make(n=24, shard_size=4, captions_per_entry=1):
        rng = np.random.default_rng(0)
        entries = []
        for i in range(n):
            image = tmp_path / "images" / f"train.json_{i}.jpg"
            image.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image, quality=95)
            captions = [f"Caption {i} {chr(97 + k)}!" for k in range(captions_per_entry)]
            entries.append(
                {"image": str(image), "image_id": i, "caption": captions[0] if captions_per_entry == 1 else captions}
            )
        path = write_json(tmp_path / "train.json", entries)
        return path, write_shards([path], str(tmp_path / "shards"), shard_size)["train_shards"]

    return make


def test_converter_writes_shards_sizes_and_the_pattern(shards, tmp_path, capsys):
    path, pattern = shards(n=10, shard_size=4, captions_per_entry=2)
    folder = tmp_path / "shards"
    assert pattern == str(folder / "shard-{000000..000002}.tar")
    assert json.loads((folder / "sizes.json").read_text()) == {
        "shard-000000.tar": 4,
        "shard-000001.tar": 4,
        "shard-000002.tar": 2,
    }
    with tarfile.open(folder / "shard-000002.tar") as tar:
        names = tar.getnames()
        assert names == ["000000008.jpg", "000000008.json", "000000009.jpg", "000000009.json"]
        assert json.loads(tar.extractfile("000000009.json").read()) == {"caption": ["Caption 9 a!", "Caption 9 b!"]}
        assert tar.extractfile("000000009.jpg").read() == open(tmp_path / "images" / "train.json_9.jpg", "rb").read()
    found = find_shards(pattern)
    assert found.counts == (4, 4, 2) and found.paths[0] == str(folder / "shard-000000.tar")
    make_shards(["--json", path, "--out", str(tmp_path / "cli"), "--shard-size", "6"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["shards"] == 2 and printed["samples"] == 10
    with tarfile.open(tmp_path / "cli" / "shard-000000.tar") as tar:
        assert "000000000.json" in tar.getnames()
    with pytest.raises(DataError, match=r"already holds shards; write into a new or empty folder"):
        write_shards([path], str(folder), 4)


def test_converter_stops_on_missing_images_unless_told_to_skip(tmp_path):
    entries = [{"image": write_image(tmp_path / f"{k}.jpg"), "caption": f"c {k}"} for k in range(4)]
    entries[2]["image"] = str(tmp_path / "gone.jpg")
    path = write_json(tmp_path / "t.json", entries)
    with pytest.raises(DataError, match=r"(?s)1 of 4 images are missing:\n  .*t\.json, entry 2: .*--skip-missing"):
        write_shards([path], str(tmp_path / "a"), 2)
    result = write_shards([path], str(tmp_path / "b"), 2, skip_missing=True)
    assert (result["samples"], result["skipped_missing"]) == (3, 1)
    with tarfile.open(tmp_path / "b" / "shard-000001.tar") as tar:
        assert tar.getnames() == ["000000003.jpg", "000000003.txt"]  # keys keep the entry's index


@pytest.mark.parametrize("workers", [0, 2])
def test_json_and_shards_give_the_same_samples(shards, tokenizer, workers):
    path, pattern = shards(n=24, shard_size=3, captions_per_entry=2)
    from_json, json_batches = samples_of(build({"train_files": [path]}, tokenizer, seed=5)[0])
    loader, _, _ = build({"train_shards": pattern, "num_workers": workers, "shuffle_buffer": 4}, tokenizer, seed=5)
    from_shards, shard_batches = samples_of(loader)
    assert sorted(from_shards) == sorted(from_json) == list(range(24)) and shard_batches == json_batches == 6
    for index, (image, tokens) in from_json.items():
        assert torch.equal(from_shards[index][0], image) and from_shards[index][1] == tokens, index
    loader.set_epoch(1)  # another epoch: the same samples, other augmentations and caption draws
    again, _ = samples_of(loader)
    assert sorted(again) == list(range(24))
    assert any(not torch.equal(again[i][0], from_shards[i][0]) for i in again)
    assert any(again[i][1] != from_shards[i][1] for i in again)


def test_ranks_read_disjoint_shards_and_the_same_number_of_batches(shards, tokenizer):
    _, pattern = shards(n=32, shard_size=4)
    found = [samples_of(build({"train_shards": pattern}, tokenizer, rank=r, world_size=2)[0]) for r in (0, 1)]
    (rank0, batches0), (rank1, batches1) = found
    assert batches0 == batches1 == 4
    assert not set(rank0) & set(rank1) and sorted(set(rank0) | set(rank1)) == list(range(32))


def test_a_rank_with_fewer_samples_reads_its_shards_again(tmp_path, tokenizer):
    entries = [{"image": write_image(tmp_path / f"{k}.jpg"), "caption": f"c {k}"} for k in range(10)]
    pattern = write_shards([write_json(tmp_path / "t.json", entries)], str(tmp_path / "s"), 7)["train_shards"]
    per_rank = []
    for rank in (0, 1):  # shards of 7 and 3 samples; 10 // (2 ranks x 2) = 2 batches of 2 each
        loader, _, _ = build({"train_shards": pattern}, tokenizer, rank=rank, world_size=2, batch=2)
        assert len(loader) == 2
        per_rank.append([i for batch in loader for i in batch["index"].tolist()])
    assert [len(indices) for indices in per_rank] == [4, 4]
    assert sorted(len(set(indices)) for indices in per_rank) == [3, 4]  # the short rank repeats one


def test_resume_skips_the_shards_already_consumed(shards, tokenizer):
    _, pattern = shards(n=24, shard_size=3)
    cfg = {"train_shards": pattern, "shuffle_buffer": 0, "num_workers": 1}
    loader, _, progress = build(cfg, tokenizer, batch=3, seed=2)
    loader.set_epoch(3)
    reference = [batch["index"].tolist() for batch in loader]
    loader.set_epoch(3)
    for step, _ in enumerate(loader):
        if step == 2:
            state = progress.state_dict()
            break
    assert state["epoch"] == 3 and len(state["consumed_shards"]) == 3
    resumed, _, resumed_progress = build(cfg, tokenizer, batch=3, seed=2)
    resumed_progress.load_state_dict(state)
    resumed.set_epoch(3)
    assert len(resumed) == 5
    rest = [batch["index"].tolist() for batch in resumed]
    assert rest == reference[3:]
    assert resumed_progress.state_dict()["epoch"] == 4 and resumed_progress.state_dict()["consumed_shards"] == []


def test_positions_of_the_other_format_are_refused(shards, tokenizer):
    path, pattern = shards(n=8, shard_size=2)
    _, _, progress = build({"train_shards": pattern}, tokenizer)
    with pytest.raises(DataError, match=r"saved for data\.train_files .* this run reads data\.train_shards"):
        progress.load_state_dict(ResumableDistributedSampler(8).state_dict())
    with pytest.raises(DataError, match=r"saved for data\.train_shards, this run reads data\.train_files"):
        ResumableDistributedSampler(8).load_state_dict(progress.state_dict())
    other = dict(progress.state_dict(), shards_digest="0" * 16)
    with pytest.raises(DataError, match=r"saved with other shards .* Use the same data\.train_shards"):
        progress.load_state_dict(other)


def write_tar(path, samples):
    """A shard of `samples` [(key, {extension: bytes})], listed in its folder's sizes.json."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sizes = os.path.join(os.path.dirname(path), "sizes.json")
    listed = json.loads(open(sizes).read()) if os.path.exists(sizes) else {}
    with open(sizes, "w") as handle:
        json.dump({**listed, os.path.basename(path): len(samples)}, handle)
    return str(path)


def jpeg(colour=(200, 30, 30)):
    out = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def bad_shard(tmp_path):
    """Two shards of four samples; in the first, sample 2 has no caption and sample 3 an image
    that does not decode."""
    good = lambda k: (f"{k:09d}", {"jpg": jpeg((10 * k, 0, 0)), "txt": f"caption {k}".encode()})
    first = [good(0), good(1), ("000000002", {"jpg": jpeg()}), ("000000003", {"jpg": b"junk", "txt": b"x"})]
    write_tar(tmp_path / "a.tar", first)
    write_tar(tmp_path / "b.tar", [good(k) for k in range(4, 8)])
    return str(tmp_path / "{a,b}.tar")


def test_a_sample_without_caption_stops_with_shard_entry_and_fix(bad_shard, tokenizer, tmp_path):
    loader, _, _ = build({"train_shards": bad_shard, "shuffle_buffer": 0}, tokenizer, batch=2)
    with pytest.raises(
        DataError,
        match=rf"{tmp_path}/a\.tar, entry 2: image 000000002\.jpg: no caption: the "
        r"sample has no \.txt, nor a \.json .*python launch/make_shards\.py.*"
        r"on_bad_sample=skip",
    ):
        list(loader)


def test_bad_samples_are_skipped_and_counted(bad_shard, tokenizer):
    cfg = {"train_shards": bad_shard, "on_bad_sample": "skip", "max_bad_fraction": 0.3, "num_workers": 2}
    loader, dataset, _ = build(cfg, tokenizer, batch=2)
    served = [i for batch in loader for i in batch["index"].tolist()]
    assert len(served) == 8 and set(served) == {0, 1, 4, 5, 6, 7}  # a.tar read twice to fill its share
    assert (dataset.bad_samples.count, sorted(dataset.bad_samples.unreadable)) == (2, [2, 3])
    reasons = {s.index: s.reason for s in dataset.bad_samples.examples}
    assert reasons[2].startswith("no caption") and reasons[3].startswith("cannot decode")


def truncate(path, keep):
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def test_shards_without_counts_stop_at_startup_and_count_finds_a_truncated_one(shards, tokenizer, tmp_path):
    """Start-up opens no tar: uncounted shards need data.samples_per_epoch or a sizes.json, which
    lilt-make-shards --count writes from the tar headers (and finds a truncated shard doing so)."""
    _, pattern = shards(n=8, shard_size=4)
    os.unlink(tmp_path / "shards" / "sizes.json")
    with pytest.raises(DataError, match=r"(?s)2 of the 2 shards in data\.train_shards have no sample count.*"
                       r"Set data\.samples_per_epoch .*lilt-make-shards --count PATTERN"):  # fmt: skip
        build({"train_shards": pattern}, tokenizer)
    assert count_shards(pattern) == {str(tmp_path / "shards" / f"shard-00000{k}.tar"): 4 for k in (0, 1)}
    make_shards(["--count", pattern])
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text()) == {
        "shard-000000.tar": 4,
        "shard-000001.tar": 4,
    }
    assert build({"train_shards": pattern}, tokenizer)[1].shards.counts == (4, 4)
    shard = tmp_path / "shards" / "shard-000001.tar"
    truncate(shard, 2500)
    assert scan_tar(str(shard))[1] == "ReadError: unexpected end of data"
    with pytest.raises(
        DataError, match=rf"{shard}: truncated or corrupt tar after \d samples \(ReadError: unexpected end of data\)"
    ):
        count_shards(pattern)


def test_a_truncated_shard_is_found_when_read_and_its_loss_counted(shards, tokenizer, tmp_path):
    _, pattern = shards(n=16, shard_size=4)
    shard = tmp_path / "shards" / "shard-000002.tar"
    truncate(shard, 2500)  # sizes.json still lists 4 samples
    loader, _, _ = build({"train_shards": pattern}, tokenizer, batch=2)
    with pytest.raises(
        DataError,
        match=rf"{shard}: truncated or corrupt tar \(ReadError: unexpected end of "
        r"data\) after \d samples; re-create it",
    ):
        list(loader)
    cfg = {"train_shards": pattern, "on_bad_sample": "skip", "max_bad_fraction": 0.5}
    loader, dataset, _ = build(cfg, tokenizer, batch=2)
    served = [i for batch in loader for i in batch["index"].tolist()]
    read = len([i for i in set(served) if 8 <= i < 12])
    assert dataset.bad_samples.lost == {str(shard): 4 - read} and dataset.bad_samples.count == 4 - read
    assert "samples lost after the first" in dataset.bad_samples.examples[0].reason


def test_a_shard_shorter_than_listed_is_counted(shards, tokenizer, tmp_path):
    _, pattern = shards(n=8, shard_size=4)
    sizes = tmp_path / "shards" / "sizes.json"
    sizes.write_text(json.dumps({"shard-000000.tar": 4, "shard-000001.tar": 6}))
    cfg = {"train_shards": pattern, "on_bad_sample": "skip", "max_bad_fraction": 0.5}
    loader, dataset, _ = build(cfg, tokenizer, batch=2)
    list(loader)
    assert dataset.bad_samples.lost == {str(tmp_path / "shards" / "shard-000001.tar"): 2}
    assert "holds 4 samples, its counts file lists 6" in dataset.bad_samples.examples[0].reason


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"train_shards": "{dir}/nope-{{0..1}}.tar"}, r"2 of the 2 shards in data\.train_shards do not exist"),
        (
            {"train_shards": "{dir}/shards/shard-{{000000..000001}}.tar", "num_workers": 2},
            r"has 2 shards, fewer than ranks x DataLoader workers = 2 x 2",
        ),
        ({"train_shards": 5}, r"data\.train_shards = 5: expected a brace pattern"),
        (
            {"train_shards": "{dir}/x.tar", "train_files": ["a.json"]},
            r"data\.train_files and data\.train_shards are both set",
        ),
        ({"shuffle_buffer": -1}, r"data\.shuffle_buffer = -1: expected an integer >= 0"),
        ({"index_cache": 3}, r"data\.index_cache = 3: expected auto, a folder, or null"),
    ],
)
def test_bad_shard_settings_are_rejected(shards, tokenizer, tmp_path, cfg, message):
    shards(n=8, shard_size=4)
    cfg = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in cfg.items()}
    with pytest.raises(LiltError, match=message):
        build(cfg, tokenizer, world_size=2 if cfg.get("num_workers") else 1)


def test_shards_with_no_good_sample_stop_instead_of_looping(tmp_path, tokenizer):
    for name in ("a", "b"):
        write_tar(tmp_path / f"{name}.tar", [(f"{k:09d}", {"jpg": jpeg()}) for k in range(3)])
    cfg = {"train_shards": str(tmp_path / "{a,b}.tar"), "on_bad_sample": "skip", "max_bad_fraction": 1.0}
    loader, _, _ = build(cfg, tokenizer, batch=2)
    with pytest.raises(DataError, match=r"(?s)every sample of the shards\n.*a\.tar.*\nis bad, e\.g\. .*no caption"):
        list(loader)
