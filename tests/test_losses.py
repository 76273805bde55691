"""Losses: exactness under real multi-process data parallelism, chunked == plain, exact accumulation.

The distributed checks spawn 1, 2 and 4 gloo processes ONCE per world size; each worker computes
every loss case (equal shards, unequal shards, exact accumulation) and writes its results to a file.
The main process compares them with independent single-process formulas on the global batch.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lilt_ds.distributed import all_gather_rows, gather_sizes, world_info
from lilt_ds.losses import (
    LOSS_REGISTRY,
    ChunkedContrastiveLoss,
    ContrastiveLoss,
    GatheredBatch,
    NonFiniteInputError,
    SigLipLoss,
    build_loss,
    chunked_clip_loss_fn,
    chunked_siglip_loss_fn,
    exact_accumulation_step,
    siglip_init_values,
)
from lilt_ds.models.dual_encoder import CLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
UNEQUAL_SHARDS = {1: [16], 2: [11, 5], 4: [7, 1, 5, 3]}
ACCUM_GLOBAL_BATCH = 32
ACCUM_STEPS = 4
EXACT = 1e-6  # relative tolerance, distributed / accumulated vs one process (model in float64)
WORLD_SIZES = (1, 2, 4)


# --------------------------------------------------------------------------------------------------
# A small dual encoder and fixed inputs, identical in every process
# --------------------------------------------------------------------------------------------------


class TinyDualEncoder(nn.Module):
    """Linear image tower, mean-pooled embedding text tower, L2 norm, learnable log-scale [1]."""

    def __init__(self, with_bias: bool = False):
        super().__init__()
        self.image_tower = nn.Linear(12, 8)
        self.token_embedding = nn.Embedding(50, 10)
        self.text_tower = nn.Linear(10, 8)
        init_scale = SIGLIP_INIT_LOGIT_SCALE if with_bias else CLIP_INIT_LOGIT_SCALE
        self.logit_scale = nn.Parameter(torch.full([1], init_scale))
        self.logit_bias = nn.Parameter(torch.full([1], SIGLIP_INIT_LOGIT_BIAS)) if with_bias else None

    def forward(self, images, input_ids, attention_mask):
        image_emb = F.normalize(self.image_tower(images), dim=-1)
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.token_embedding(input_ids) * mask).sum(1) / mask.sum(1)
        text_emb = F.normalize(self.text_tower(pooled), dim=-1)
        outputs = (image_emb, text_emb, self.logit_scale.exp())
        return outputs if self.logit_bias is None else outputs + (self.logit_bias,)


def make_model(with_bias: bool) -> TinyDualEncoder:
    """float64, so that 1e-6 tests exactness of the scaling, not fp32 summation order (~1e-6)."""
    torch.manual_seed(0)
    return TinyDualEncoder(with_bias).double()


def make_batch(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 7, (n,), generator=gen)
    return {
        "images": torch.randn(n, 12, generator=gen, dtype=torch.float64),
        "input_ids": torch.randint(0, 50, (n, 6), generator=gen),
        "attention_mask": (torch.arange(6)[None, :] < lengths[:, None]).long(),
    }


def rows_of(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


def split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    n = batch["images"].shape[0] // parts
    return [rows_of(batch, i * n, (i + 1) * n) for i in range(parts)]


def encode(model, batch):
    return model(batch["images"], batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------------------------------------
# Independent single-process formulas (what every distributed configuration must reproduce)
# --------------------------------------------------------------------------------------------------


def reference_clip(image_emb, text_emb, logit_scale):
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_siglip(image_emb, text_emb, logit_scale, logit_bias):
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    labels = 2 * torch.eye(len(logits)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


# name -> (loss factory, model has a SigLIP bias, reference formula)
CASES = {
    "clip_local": (lambda: ContrastiveLoss(local_loss=True), False, reference_clip),
    "clip_global": (lambda: ContrastiveLoss(local_loss=False), False, reference_clip),
    "clip_global_nograd_gather": (
        lambda: ContrastiveLoss(local_loss=False, gather_with_grad=False),
        False,
        reference_clip,
    ),
    "siglip": (SigLipLoss, True, reference_siglip),
    "siglip_chunked": (lambda: SigLipLoss(chunk_size=3), True, reference_siglip),
    "chunked_local": (lambda: ChunkedContrastiveLoss(chunk_size=3, local_loss=True), False, reference_clip),
    "chunked_global": (lambda: ChunkedContrastiveLoss(chunk_size=5, local_loss=False), False, reference_clip),
}
LAYOUTS = ("equal", "unequal", "accumulated")


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*encode(model, batch))
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters()]


def accumulated_loss_and_grads(model, loss_fn, batch, steps):
    model.zero_grad(set_to_none=True)
    loss = exact_accumulation_step(model, split(batch, steps), loss_fn, lambda loss_i: loss_i.backward())
    return loss.item(), [p.grad.detach().clone() for p in model.parameters()]


@functools.cache
def reference(case: str, layout: str):
    """(loss, grads) of the global batch in one process, with the naive formula."""
    _, with_bias, formula = CASES[case]
    batch = make_batch(ACCUM_GLOBAL_BATCH if layout == "accumulated" else GLOBAL_BATCH)
    return loss_and_grads(make_model(with_bias), formula, batch)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert len(actual) == len(expected)
    return max(relative_error(a, e) for a, e in zip(actual, expected))


# --------------------------------------------------------------------------------------------------
# The spawned worker: one process group per world size, every case inside
# --------------------------------------------------------------------------------------------------


def _rank_shard(layout: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    if layout == "accumulated":
        per_rank = ACCUM_GLOBAL_BATCH // world_size
        return rows_of(make_batch(ACCUM_GLOBAL_BATCH), rank * per_rank, (rank + 1) * per_rank)
    sizes = [GLOBAL_BATCH // world_size] * world_size if layout == "equal" else UNEQUAL_SHARDS[world_size]
    start = sum(sizes[:rank])
    return rows_of(make_batch(GLOBAL_BATCH), start, start + sizes[rank])


def _average_over_ranks(grads: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """What DeepSpeed does to gradients: all-reduce, then divide by the world size."""
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world_size
    return grads


def _gather_rows_probe(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """all_gather_rows on unequal shards, with and without gradient, against a fixed weighting."""
    sizes = UNEQUAL_SHARDS[world_size]
    everything = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3)
    weights = torch.linspace(-1, 1, everything.numel()).reshape(everything.shape)
    start = sum(sizes[:rank])
    probe = {"sizes": torch.tensor(gather_sizes(sizes[rank]))}
    for with_grad in (True, False):
        mine = everything[start : start + sizes[rank]].clone().requires_grad_()
        gathered = all_gather_rows(mine, gather_sizes(sizes[rank]), with_grad=with_grad)
        (gathered * weights).sum().backward()
        probe[f"gathered_{with_grad}"] = gathered.detach()
        probe[f"grad_{with_grad}"] = mine.grad
        probe[f"expected_grad_{with_grad}"] = weights[start : start + sizes[rank]] * (world_size if with_grad else 1)
    probe["everything"] = everything
    return probe


def _input_errors_probe(rank: int, world_size: int) -> dict[str, str]:
    """The error each rank raises when the LAST rank has a NaN, and when rank 0's width differs."""
    messages = {}
    text_emb = _unit_rows(4, 8, rank)
    if rank == world_size - 1:
        text_emb[2, 3] = float("nan")
    width = 6 if rank == 0 and world_size > 1 else 8
    for name, inputs in (
        ("nan", (_unit_rows(4, 8, rank), text_emb)),
        ("width", (_unit_rows(4, width, rank), _unit_rows(4, width, rank + 10))),
    ):
        try:
            ContrastiveLoss()(*inputs, torch.tensor([10.0]))
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = f"{type(error).__name__}: {error}"
    return messages


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        assert world_info() == (rank, world_size)
        results = {
            "gather_rows": _gather_rows_probe(rank, world_size),
            "input_errors": _input_errors_probe(rank, world_size),
        }
        for case, (make_loss, with_bias, _) in CASES.items():
            for layout in LAYOUTS:
                model, loss_fn = make_model(with_bias), make_loss()
                shard = _rank_shard(layout, rank, world_size)
                if layout == "accumulated":
                    loss, grads = accumulated_loss_and_grads(model, loss_fn, shard, ACCUM_STEPS)
                else:
                    loss, grads = loss_and_grads(model, loss_fn, shard)
                results[f"{case}/{layout}"] = {"loss": loss, "grads": _average_over_ranks(grads, world_size)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(
    scope="module",
    params=[pytest.param(w, marks=[pytest.mark.slow] if w > 2 else []) for w in WORLD_SIZES],
    ids=lambda w: f"world{w}",
)
def spawned(request, tmp_path_factory):
    """(world_size, per-rank results) from one spawn of ``world_size`` gloo processes."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    mp.spawn(_worker, args=(world_size, str(out_dir / "pg_init"), str(out_dir)), nprocs=world_size, join=True)
    return world_size, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_rank_averaged_gradient_equals_global_batch_gradient(spawned, case, layout):
    world_size, per_rank = spawned
    _, expected_grads = reference(case, layout)
    for rank, results in enumerate(per_rank):
        error = max_relative_error(results[f"{case}/{layout}"]["grads"], expected_grads)
        assert error < EXACT, f"rank {rank}/{world_size}: averaged gradient off by {error:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_every_rank_reports_the_global_loss(spawned, case, layout):
    _, per_rank = spawned
    expected_loss, _ = reference(case, layout)
    reported = [results[f"{case}/{layout}"]["loss"] for results in per_rank]
    assert len(set(reported)) == 1, f"ranks disagree bitwise: {reported}"
    assert reported[0] == pytest.approx(expected_loss, rel=EXACT)


def test_all_gather_rows_handles_unequal_shards_and_sums_gradients(spawned):
    world_size, per_rank = spawned
    for rank, results in enumerate(per_rank):
        probe = results["gather_rows"]
        assert probe["sizes"].tolist() == UNEQUAL_SHARDS[world_size]
        for with_grad in (True, False):
            torch.testing.assert_close(probe[f"gathered_{with_grad}"], probe["everything"], rtol=0, atol=0)
            torch.testing.assert_close(probe[f"grad_{with_grad}"], probe[f"expected_grad_{with_grad}"])


def test_a_bad_input_on_one_rank_raises_the_same_error_on_every_rank(spawned):
    world_size, per_rank = spawned
    last = world_size - 1
    where = f" on rank {last}" if world_size > 1 else ""
    expected_nan = f"NonFiniteInputError: non-finite values (NaN or inf) in text_emb{where}"
    expected_width = (
        f"ValueError: embedding width differs across ranks: {[6] + [8] * last}" if world_size > 1 else ("no error")
    )
    for results in per_rank:
        assert results["input_errors"] == {"nan": expected_nan, "width": expected_width}


def test_without_process_group_losses_match_the_formulas():
    assert world_info() == (0, 1)
    for case, (make_loss, with_bias, formula) in CASES.items():
        batch = make_batch(GLOBAL_BATCH)
        loss, grads = loss_and_grads(make_model(with_bias), make_loss(), batch)
        expected_loss, expected_grads = reference(case, "equal")
        assert loss == pytest.approx(expected_loss, rel=EXACT), case
        assert max_relative_error(grads, expected_grads) < EXACT, case


# --------------------------------------------------------------------------------------------------
# Exact gradient accumulation (single process)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["clip_local", "siglip"])
def test_exact_accumulation_equals_one_large_batch(case):
    make_loss, with_bias, _ = CASES[case]
    batch = make_batch(ACCUM_GLOBAL_BATCH)  # k=4 micro-batches of b=8
    full_loss, full_grads = loss_and_grads(make_model(with_bias), make_loss(), batch)
    accumulated_loss, accumulated_grads = accumulated_loss_and_grads(
        make_model(with_bias), make_loss(), batch, ACCUM_STEPS
    )
    assert accumulated_loss == pytest.approx(full_loss, rel=EXACT)
    assert max_relative_error(accumulated_grads, full_grads) < EXACT


def test_naive_accumulation_does_not_equal_one_large_batch():
    """Guards the test above: per-micro-batch losses (grads summed / k) are a different objective."""
    batch = make_batch(ACCUM_GLOBAL_BATCH)
    _, full_grads = loss_and_grads(make_model(False), ContrastiveLoss(), batch)
    model, loss_fn = make_model(False), ContrastiveLoss()
    for micro_batch in split(batch, ACCUM_STEPS):
        (loss_fn(*encode(model, micro_batch)) / ACCUM_STEPS).backward()
    naive_grads = [p.grad for p in model.parameters()]
    assert max_relative_error(naive_grads, full_grads) > 0.05


def test_exact_accumulation_replays_dropout_masks():
    """With dropout, each re-encode must see the masks of its cached pass: the gradient then equals
    that of one pass over the micro-batches in order, concatenated, with the same RNG stream."""
    batch = make_batch(ACCUM_GLOBAL_BATCH)

    def with_dropout():
        model = make_model(False)
        model.image_tower = nn.Sequential(nn.Dropout(0.5), model.image_tower)
        return model.train()

    reference_model, loss_fn = with_dropout(), ContrastiveLoss()
    torch.manual_seed(7)
    outputs = [encode(reference_model, micro) for micro in split(batch, ACCUM_STEPS)]
    loss_fn(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2]).backward()
    model = with_dropout()
    torch.manual_seed(7)
    exact_accumulation_step(model, split(batch, ACCUM_STEPS), loss_fn, lambda loss: loss.backward())
    assert (
        max_relative_error([p.grad for p in model.parameters()], [p.grad for p in reference_model.parameters()]) < EXACT
    )


def test_exact_accumulation_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one micro-batch"):
        exact_accumulation_step(make_model(False), [], ContrastiveLoss(), lambda loss: loss.backward())


# --------------------------------------------------------------------------------------------------
# Chunked == plain
# --------------------------------------------------------------------------------------------------


def _unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _value_and_grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("local_loss", [True, False])
def test_chunked_loss_module_equals_contrastive_loss(chunk_size, local_loss):
    image_emb, text_emb, scale = _unit_rows(37, 24, 1), _unit_rows(37, 24, 2), torch.tensor([14.0])
    expected, expected_grads = _value_and_grads(ContrastiveLoss(local_loss=local_loss), image_emb, text_emb, scale)
    chunked = ChunkedContrastiveLoss(chunk_size=chunk_size, local_loss=local_loss)
    actual, actual_grads = _value_and_grads(chunked, image_emb, text_emb, scale)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_chunked_function_equals_matrix_formula_for_one_ranks_rows(chunk_size):
    """37 local rows at offset 9 inside 53 gathered rows (one rank's share, odd sizes)."""
    offset, rows, total = 9, 37, 53
    all_img, all_txt = _unit_rows(total, 24, 3), _unit_rows(total, 24, 4)
    local_img, local_txt = all_img[offset : offset + rows], all_txt[offset : offset + rows]
    scale = torch.tensor([14.0])

    def matrix_formula(li, lt, ai, at, s):
        labels = torch.arange(offset, offset + rows)
        return (
            F.cross_entropy(s * li @ at.T, labels, reduction="sum")
            + F.cross_entropy(s * lt @ ai.T, labels, reduction="sum")
        ) / 2

    def chunked(li, lt, ai, at, s):
        return chunked_clip_loss_fn(li, lt, ai, at, s, offset, chunk_size)

    inputs = (local_img, local_txt, all_img, all_txt, scale)
    expected, expected_grads = _value_and_grads(matrix_formula, *inputs)
    actual, actual_grads = _value_and_grads(chunked, *inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_function_passes_gradcheck():
    double = [_unit_rows(n, 5, seed).double().requires_grad_() for n, seed in ((4, 1), (4, 2), (7, 3), (7, 4))]
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: chunked_clip_loss_fn(*t, 2, 3), (*double, scale))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [2, 5, 64])
def test_chunked_siglip_equals_the_matrix_form_and_passes_gradcheck(chunk_size, with_bias):
    """One rank's 4 image rows (at offset 3) against 11 gathered texts: value and every gradient."""
    torch.manual_seed(0)
    rows, texts = _unit_rows(4, 6, 1).double().requires_grad_(), _unit_rows(11, 6, 2).double().requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True) if with_bias else None
    batch = GatheredBatch(local_img=rows, local_txt=rows, all_img=texts, all_txt=texts, offset=3, world_size=1)
    plain = SigLipLoss(chunk_size=1024).summed_loss(batch, scale, bias)  # 11 texts: the matrix form
    chunked = SigLipLoss(chunk_size=chunk_size).summed_loss(batch, scale, bias)
    leaves = [t for t in (rows, texts, scale, bias) if t is not None]
    expected, actual = torch.autograd.grad(plain, leaves), torch.autograd.grad(chunked, leaves)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    assert all(torch.allclose(a, e, rtol=1e-10, atol=1e-12) for a, e in zip(actual, expected))
    inputs = tuple(t.detach().requires_grad_() for t in leaves)
    assert torch.autograd.gradcheck(
        lambda q, k, s, *b: chunked_siglip_loss_fn(q, k, s, b[0] if b else None, 3, chunk_size), inputs
    )


def test_chunked_function_rejects_rows_outside_the_gathered_batch():
    rows = _unit_rows(4, 5, 1)
    with pytest.raises(ValueError, match="offset 3 puts 4 local rows outside 6"):
        chunked_clip_loss_fn(rows, rows, _unit_rows(6, 5, 2), _unit_rows(6, 5, 3), torch.tensor(1.0), 3, 2)


# --------------------------------------------------------------------------------------------------
# Bad input, factory, constants
# --------------------------------------------------------------------------------------------------

SCALE = torch.tensor([10.0])


@pytest.mark.parametrize(
    "image_emb, text_emb, logit_scale, message",
    [
        (torch.ones(4, 8), torch.ones(4, 6), SCALE, r"shapes differ: \(4, 8\) vs \(4, 6\)"),
        (torch.ones(4, 8), torch.ones(5, 8), SCALE, r"shapes differ: \(4, 8\) vs \(5, 8\)"),
        (torch.ones(8), torch.ones(8), SCALE, r"image_emb must be 2-D \[batch, dim\], got shape \(8,\)"),
        (torch.ones(4, 8), torch.ones(4, 8, 1), SCALE, r"text_emb must be 2-D"),
        (torch.ones(0, 8), torch.ones(0, 8), SCALE, "empty batch"),
        (torch.ones(4, 8), torch.ones(4, 8), torch.ones(2), r"logit_scale must hold one value"),
        (torch.ones(4, 8), torch.full((4, 8), float("nan")), SCALE, r"non-finite .* in text_emb$"),
        (torch.full((4, 8), float("inf")), torch.ones(4, 8), SCALE, r"non-finite .* in image_emb$"),
        (torch.ones(4, 8), torch.ones(4, 8), torch.tensor([float("inf")]), r"non-finite .* in logit_scale$"),
    ],
)
@pytest.mark.parametrize("loss_type", ["clip", "siglip", "chunked"])
def test_bad_inputs_raise_clear_errors(loss_type, image_emb, text_emb, logit_scale, message):
    with pytest.raises(ValueError, match=message):
        build_loss({"type": loss_type})(image_emb, text_emb, logit_scale)


def test_non_finite_inputs_raise_the_dedicated_subclass():
    emb = _unit_rows(4, 8, 1)
    with pytest.raises(NonFiniteInputError, match=r"in image_emb, logit_scale$"):
        ContrastiveLoss()(emb * float("nan"), emb, torch.tensor([float("inf")]))


def test_softmax_losses_reject_a_logit_bias():
    emb = _unit_rows(4, 8, 1)
    for loss_fn in (ContrastiveLoss(), ChunkedContrastiveLoss(chunk_size=2)):
        with pytest.raises(ValueError, match="logit_bias.*never train"):
            loss_fn(emb, emb, SCALE, torch.tensor([-10.0]))


def test_siglip_checks_the_bias_shape_and_accepts_no_bias():
    emb = _unit_rows(4, 8, 1)
    with pytest.raises(ValueError, match="logit_bias must hold one value"):
        SigLipLoss()(emb, emb, SCALE, torch.zeros(3))
    no_bias = SigLipLoss()(emb, emb, SCALE)
    zero_bias = SigLipLoss()(emb, emb, SCALE, torch.zeros(1))
    torch.testing.assert_close(no_bias, zero_bias)


def test_local_loss_without_gradient_gather_is_rejected():
    with pytest.raises(ValueError, match="gather_with_grad=False drops the gradient"):
        ContrastiveLoss(local_loss=True, gather_with_grad=False)


def test_build_loss_uses_the_registry_and_passes_options():
    config = {"local_loss": False, "gather_with_grad": True}
    clip = build_loss({"type": "clip", **config})
    chunked = build_loss({"type": "chunked", **config, "chunk_size": 128})
    siglip = build_loss({"type": "siglip"})
    assert type(clip) is ContrastiveLoss and clip.local_loss is False
    assert type(chunked) is ChunkedContrastiveLoss and chunked.chunk_size == 128 and chunked.local_loss is False
    assert type(siglip) is SigLipLoss
    assert type(build_loss({})) is ContrastiveLoss


def test_options_of_other_loss_types_are_refused_unless_they_keep_their_default():
    """The experiment config lists every loss option: unchanged ones of other types are left out, a
    changed one is a mistake (it would do nothing), never dropped silently."""
    section = {"type": "siglip", "local_loss": True, "gather_with_grad": True, "chunk_size": 4096, "tile_rows": None}
    assert type(build_loss(section)) is SigLipLoss
    with pytest.raises(
        ValueError,
        match=r"loss\.chunk_size=1024 is an option of loss\.type chunked or fused or "
        r"siglip, not clip: set loss\.type=chunked",
    ):
        build_loss({**section, "type": "clip", "chunk_size": 1024})
    with pytest.raises(ValueError, match=r"loss\.local_loss=true with loss\.gather_with_grad=false"):
        build_loss({"type": "clip", "local_loss": True, "gather_with_grad": False})


def test_build_loss_rejects_unknown_type_and_options():
    allowed = ", ".join(sorted(LOSS_REGISTRY))  # the fused kernel registers itself too
    assert {"chunked", "clip", "siglip", "fused"} <= set(LOSS_REGISTRY)
    with pytest.raises(ValueError, match=rf"unknown loss type 'infonce'; allowed types: {allowed}"):
        build_loss({"type": "infonce"})
    with pytest.raises(ValueError, match=r"unknown config key 'loss\.chunksize'.*Closest valid keys: loss\.chunk_size"):
        build_loss({"type": "chunked", "chunksize": 4})
    with pytest.raises(ValueError, match=r"loss\.chunk_size = 0: expected an integer >= 1"):
        build_loss({"type": "chunked", "chunk_size": 0})


def test_siglip_init_values():
    log_scale, bias = siglip_init_values()
    assert torch.tensor(log_scale).exp().item() == pytest.approx(10.0)
    assert bias == -10.0


@pytest.mark.slow
def test_memory_benchmark_runs_and_prints_a_table():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "loss_memory.py"),
            "--sizes",
            "512",
            "--world",
            "2",
            "--chunk-size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    table_rows = [line for line in result.stdout.splitlines() if line.startswith("| 512 ")]
    assert len(table_rows) == 5, result.stdout
    assert {"global", "local", "chunked", "siglip", "siglip_chunked"} == {
        row.split("|")[2].strip() for row in table_rows
    }
    sigmoid = {row.split("|")[2].strip(): row.split("|")[5].strip() for row in table_rows}
    assert sigmoid["siglip"] == "100.0%" and float(sigmoid["siglip_chunked"].rstrip("%")) < 100
