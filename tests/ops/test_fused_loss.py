"""The fused contrastive loss equals the chunked reference (value and every gradient) on CPU."""

import os

import pytest
import torch
import torch.nn.functional as F

from lilt_ds.losses import ChunkedContrastiveLoss, build_loss, chunked_clip_loss_fn
from lilt_ds.ops import FusedContrastiveLoss, Kernels, builder, fused_clip_loss_fn, select


@pytest.fixture(scope="module")
def kernels():
    selection = select("contrastive", "cpu")
    if not selection.fused:
        pytest.skip(f"fused kernel unavailable here: {selection.description}")
    return Kernels(selection)


def unit_rows(rows, dim, generator):
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1).requires_grad_()


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    """The kernel splits work by thread count (one-pass or two-pass backward, column groups): run both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "b, n, dim, offset", [(5, 13, 7, 8), (33, 70, 37, 0), (64, 257, 256, 100), (1, 1, 3, 0), (40, 40, 17, 0)]
)
@pytest.mark.parametrize("tiles", [(1, 1), (3, 5), (16, 32), (64, 512), (256, 256)])
def test_fused_matches_chunked_reference(kernels, threads, b, n, dim, offset, tiles):
    generator = torch.Generator().manual_seed(b * 1000 + n)
    tensors = [unit_rows(rows, dim, generator) for rows in (b, b, n, n)]
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    reference = chunked_clip_loss_fn(*tensors, scale, offset, 8)
    fused = fused_clip_loss_fn(*tensors, scale, offset, kernels, *tiles)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    wrt = [*tensors, scale]
    for got, want in zip(torch.autograd.grad(fused, wrt), torch.autograd.grad(reference, wrt)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["fused", "triton"])
def implementation(request, monkeypatch):
    """LILT_DS_KERNELS for the test: the C++ kernel, or Triton's (through the interpreter tests/conftest.py sets)."""
    monkeypatch.setenv("LILT_DS_KERNELS", request.param)
    builder.select.cache_clear()
    if request.param == "fused" and not builder.select("contrastive", "cpu").fused:
        pytest.skip("the C++ kernel cannot be built here")
    yield request.param
    builder.select.cache_clear()


@pytest.mark.parametrize("local_loss", [True, False])
def test_fused_module_is_a_drop_in_for_chunked(implementation, local_loss):
    generator = torch.Generator().manual_seed(0)
    img, txt = unit_rows(29, 24, generator), unit_rows(29, 24, generator)
    log_scale = torch.tensor([2.3], requires_grad=True)
    results = []
    for loss_fn in (
        ChunkedContrastiveLoss(chunk_size=8, local_loss=local_loss),
        FusedContrastiveLoss(chunk_size=8, local_loss=local_loss, tile_rows=16, tile_cols=16),
    ):
        loss = loss_fn(img, txt, log_scale.exp())
        results.append((loss, *torch.autograd.grad(loss, [img, txt, log_scale])))
    assert FusedContrastiveLoss.implementation("cpu") == implementation
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_registry_builds_fused_with_chunked_and_tile_options():
    loss = build_loss({"type": "fused", "chunk_size": 16, "tile_rows": 8, "local_loss": True})
    assert isinstance(loss, FusedContrastiveLoss)
    assert (loss.chunk_size, loss.tile_rows, loss.tile_cols) == (16, 8, None)
    with pytest.raises(ValueError, match="tile_rows"):
        FusedContrastiveLoss(tile_rows=0)


def two_rank_grads(rank, world_size, runs):
    """One rank's loss and gradients on its shard (5 and 6 rows) of one batch, for each run
    ``(loss_type, LILT_DS_KERNELS, scale, (tile_rows, tile_cols))`` in one process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = []
    for loss_type, kernels_env, scale_value, tiles in runs:
        os.environ["LILT_DS_KERNELS"] = kernels_env
        builder.select.cache_clear()
        generator = torch.Generator().manual_seed(0)
        img, txt = unit_rows(11, 16, generator), unit_rows(11, 16, generator)
        sizes = (5, 6)  # unequal shards
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        my_img, my_txt = img[rows].detach().requires_grad_(), txt[rows].detach().requires_grad_()
        scale = torch.tensor([scale_value], requires_grad=True)
        options = {"type": loss_type, "chunk_size": 4}
        if loss_type == "fused":
            options.update(tile_rows=tiles[0], tile_cols=tiles[1])
        loss = build_loss(options)(my_img, my_txt, scale)
        loss.backward()
        results.append(
            {"loss": loss.item(), "img": my_img.grad.tolist(), "txt": my_txt.grad.tolist(), "scale": scale.grad.item()}
        )
    dist.destroy_process_group()
    return results


@pytest.mark.slow
def test_fused_is_exact_across_two_gloo_ranks_like_chunked(kernels, tmp_path):
    from tests.distributed import run_ranks

    runs = [("chunked", "reference", 14.0, (2, 3)), ("fused", "fused", 14.0, (2, 3))]
    for chunked, fused in run_ranks(two_rank_grads, 2, tmp_path, runs):
        for key in chunked:
            torch.testing.assert_close(torch.tensor(fused[key]), torch.tensor(chunked[key]), atol=1e-5, rtol=1e-5)
