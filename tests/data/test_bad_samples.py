"""Counting skipped samples and the abort threshold (lilt_ds/data/bad_samples.py)."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lilt_ds.data import BadSample, BadSampleLog, DataError, global_bad_sample_counts


def bad(index, reason="cannot decode"):
    return BadSample(index, "train.json", index, f"/img/{index}.jpg", reason)


def test_log_counts_distinct_entries_and_replaced_draws():
    log = BadSampleLog(dataset_size=100, max_bad_fraction=0.05)
    log.record_missing([bad(1, "file not found")])
    for index in (1, 2, 2, 3):
        log.record(bad(index))
    assert (log.count, len(log.missing), len(log.unreadable), log.replaced) == (3, 1, 2, 4)
    restored = BadSampleLog(100, 0.05)
    restored.load_state_dict(log.state_dict())
    assert restored.unreadable == log.unreadable and restored.replaced == 4


def test_log_aborts_above_the_threshold_with_examples():
    log = BadSampleLog(dataset_size=100, max_bad_fraction=0.02)
    log.record(bad(5))
    log.record(bad(6))
    with pytest.raises(DataError) as err:
        log.record(bad(7))
    message = str(err.value)
    assert "3 of 100 entries (3.00%)" in message and "data.max_bad_fraction = 0.02" in message
    assert "train.json, entry 5: image /img/5.jpg: cannot decode" in message


def test_global_counts_without_distributed_are_local():
    log = BadSampleLog(10, 1.0)
    log.record(bad(4))
    assert global_bad_sample_counts(log) == {"bad_entries": 1, "missing": 0, "unreadable": 1, "replaced": 1}


def _count_on_rank(rank, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=2)
    log = BadSampleLog(100, 1.0)
    log.record_missing([bad(0, "file not found")])  # the load-time check finds it on both ranks
    for index in [1, 2] if rank == 0 else [2, 3, 3]:
        log.record(bad(index))
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(global_bad_sample_counts(log)))
    dist.destroy_process_group()


def test_global_counts_sum_over_ranks(tmp_path):
    mp.start_processes(_count_on_rank, args=(tmp_path,), nprocs=2, start_method="fork")
    expected = {"bad_entries": 4, "missing": 1, "unreadable": 3, "replaced": 5}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
