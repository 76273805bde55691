"""Sharding, per-epoch shuffling and mid-epoch resume (lilt_ds/data/sampler.py)."""

import pytest
from torch.utils.data import DistributedSampler

from lilt_ds.data import DataError, ResumableDistributedSampler


def indices(sampler):
    return [index for _, index in sampler]


def test_two_ranks_get_disjoint_shards_that_cover_the_dataset():
    shards = [indices(ResumableDistributedSampler(20, rank, 2, seed=5)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 10
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(20))


@pytest.mark.parametrize("size, world, drop_last", [(10, 3, False), (10, 3, True), (2, 4, False)])
def test_order_matches_torch_distributed_sampler(size, world, drop_last):
    for rank in range(world):
        ours = ResumableDistributedSampler(size, rank, world, shuffle=False, drop_last=drop_last)
        theirs = DistributedSampler(range(size), world, rank, shuffle=False, drop_last=drop_last)
        assert indices(ours) == list(theirs) and len(ours) == len(theirs)


def test_uneven_sizes_are_padded_to_equal_counts():
    shards = [indices(ResumableDistributedSampler(10, rank, 3, seed=0)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(sum(shards, [])) == set(range(10))


def test_each_epoch_is_a_new_seeded_permutation_tagged_with_the_epoch():
    sampler = ResumableDistributedSampler(50, seed=1)
    sampler.set_epoch(3)
    pairs = list(sampler)
    assert {epoch for epoch, _ in pairs} == {3}
    again = ResumableDistributedSampler(50, seed=1)
    again.set_epoch(3)
    assert list(again) == pairs
    sampler.set_epoch(4)
    assert indices(sampler) != [index for _, index in pairs]
    assert indices(ResumableDistributedSampler(50, seed=2)) != indices(ResumableDistributedSampler(50, seed=1))


def test_mid_epoch_resume_yields_the_remaining_indices_in_order():
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(23, rank, 2, seed=7)
        sampler.set_epoch(2)
        full = indices(sampler)
        sampler.advance(5)
        state = sampler.state_dict()
        assert (state["epoch"], state["consumed"]) == (2, 5)
        resumed = ResumableDistributedSampler(23, rank, 2, seed=7)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the usual per-epoch call keeps the restored position
        assert indices(resumed) == full[5:] and len(resumed) == len(full) - 5


def test_resume_on_another_world_size_covers_the_rest_of_the_epoch_once():
    old = [ResumableDistributedSampler(24, rank, 2, seed=3) for rank in (0, 1)]
    full_order = old[0].epoch_order().tolist()
    for sampler in old:
        sampler.advance(4)  # 8 samples consumed over both ranks
    state = old[0].state_dict()
    new = [ResumableDistributedSampler(24, rank, 4, seed=3) for rank in range(4)]
    for sampler in new:
        sampler.load_state_dict(state)
    rest = [indices(sampler) for sampler in new]
    assert sorted(sum(rest, [])) == sorted(full_order[8:])
    assert len({len(r) for r in rest}) == 1


def test_a_finished_epoch_is_saved_as_the_start_of_the_next():
    sampler = ResumableDistributedSampler(10, 0, 2)
    sampler.set_epoch(1)
    sampler.finish_epoch()
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["consumed"] == 0
    assert len(indices(sampler)) == 5  # iterating again replays the epoch, like DistributedSampler


def test_state_from_another_dataset_is_rejected():
    state = ResumableDistributedSampler(10).state_dict()
    with pytest.raises(DataError, match=r"saved with a dataset of 10 entries, this run has 12"):
        ResumableDistributedSampler(12).load_state_dict(state)
    with pytest.raises(DataError, match=r"lacks \['consumed'\]"):
        ResumableDistributedSampler(10).load_state_dict({"epoch": 1})


def test_bad_rank_is_rejected():
    with pytest.raises(DataError, match=r"rank 2 / world size 2"):
        ResumableDistributedSampler(10, rank=2, world_size=2)
