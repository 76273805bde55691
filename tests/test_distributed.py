"""Distributed helpers without a process group (the multi-rank behaviour is tested in test_losses.py,
inside the same spawned gloo workers as the losses)."""

import torch

from lilt_ds.distributed import all_gather_rows, all_reduce_sum, gather_sizes, is_distributed, world_info


def test_world_info_without_process_group_is_single_rank():
    assert not is_distributed()
    assert world_info() == (0, 1)


def test_collectives_are_identities_in_a_single_process():
    rows = torch.randn(5, 3, requires_grad=True)
    assert gather_sizes(5) == [5]
    assert all_gather_rows(rows, [5]) is rows
    total = torch.tensor(2.5, requires_grad=True)
    reduced = all_reduce_sum(total)
    assert reduced.item() == 2.5 and not reduced.requires_grad
    reduced += 1  # a copy: the input is untouched
    assert total.item() == 2.5
