"""The Triton kernel of the fused loss, run on CPU tensors by Triton's interpreter, equals the chunked
reference (value and every input gradient), across ranks too, and repeats bit for bit (the loss module
runs it too: tests/ops/test_fused_loss.py).

The interpreter cannot show what only a GPU shows (races, register spills, shared-memory limits,
TF32): benchmarks/gpu_check.py runs the same comparisons on CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton comes with torch's CUDA build")

from lilt_ds.losses import chunked_clip_loss_fn  # noqa: E402
from lilt_ds.ops import Kernels, builder, fused_clip_loss_fn  # noqa: E402
from lilt_ds.ops import triton_contrastive as tc  # noqa: E402  (tests/conftest.py set TRITON_INTERPRET=1)


@pytest.fixture
def triton_kernels(monkeypatch):
    assert tc.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"
    monkeypatch.setenv("LILT_DS_KERNELS", "triton")
    builder.select.cache_clear()
    selection = builder.select("contrastive", "cpu")
    assert selection.kind == "triton" and selection.module is tc
    yield Kernels(selection)
    builder.select.cache_clear()


def unit_rows(rows, dim, generator, dtype=torch.float32):
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1).to(dtype).requires_grad_()


# (B local rows, N gathered rows, d, offset of the local rows, (tile_rows, tile_cols), column splits)
CASES = [
    (5, 13, 7, 8, (16, 16), None),
    (33, 70, 37, 0, (32, 16), 3),
    (64, 257, 256, 100, (32, 64), 2),
    (1, 1, 3, 0, (16, 16), 1),
    (40, 40, 17, 0, (64, 32), None),
    (48, 300, 64, 250, (16, 64), 5),
]


def assert_within(got, want, scale, tol=1e-5):
    """|got - want| <= tol, relative to the size of the terms where that exceeds 1: a gradient is a
    sum of terms of size ~scale (they cancel for a lone pair), and fp32 logits s * q.k carry rounding
    ~scale * 1e-7 in either implementation."""
    error = (got.double() - want.double()).abs().max().item()
    bound = tol * max(1.0, scale, want.double().abs().max().item())
    assert error <= bound, f"max difference {error:.3g} > {bound:.3g}"


def loss_and_grads(loss_fn, tensors, scale):
    loss = loss_fn(*tensors, scale)
    return [loss, *torch.autograd.grad(loss, [*tensors, scale])]


@pytest.mark.parametrize(
    "b, n, dim, offset, tiles, splits, scale_value",
    [(*case, 100.0) for case in CASES] + [(*case, 1.0) for case in CASES[:3]],
)
def test_triton_matches_chunked_reference(triton_kernels, monkeypatch, b, n, dim, offset, tiles, splits, scale_value):
    forward, backward = tc.lse_forward, tc.lse_backward  # the split count is the kernel's choice: force this one
    monkeypatch.setattr(tc, "lse_forward", lambda *a: forward(*a, splits=splits))
    monkeypatch.setattr(tc, "lse_backward", lambda *a: backward(*a, splits=splits))
    generator = torch.Generator().manual_seed(b * 1000 + n)
    tensors = [unit_rows(rows, dim, generator) for rows in (b, b, n, n)]
    scale = torch.tensor(scale_value, requires_grad=True)
    want = loss_and_grads(lambda *t: chunked_clip_loss_fn(*t[:4], t[4], offset, 8), tensors, scale)
    got = loss_and_grads(lambda *t: fused_clip_loss_fn(*t[:4], t[4], offset, triton_kernels, *tiles), tensors, scale)
    for g, w in zip(got, want):
        assert_within(g, w, scale_value)


def test_bf16_inputs_accumulate_in_fp32(triton_kernels):
    """bf16 rows (under the interpreter raised to fp32 before each tl.dot) against the reference on the
    same bf16 values in fp32: only the bf16 gradients' own rounding differs."""
    generator = torch.Generator().manual_seed(3)
    rows = [unit_rows(r, 48, generator, torch.bfloat16) for r in (24, 24, 90, 90)]
    scale = torch.tensor(100.0, requires_grad=True)
    got = loss_and_grads(lambda *t: fused_clip_loss_fn(*t[:4], t[4], 30, triton_kernels), rows, scale)
    as_fp32 = [r.detach().float().requires_grad_() for r in rows]
    want = loss_and_grads(lambda *t: chunked_clip_loss_fn(*t[:4], t[4], 30, 16), as_fp32, scale)
    assert [g.dtype for g in got[1:5]] == [torch.bfloat16] * 4
    torch.testing.assert_close(got[0].float(), want[0], atol=0.5, rtol=1e-2)  # the loss value is rounded to bf16
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w, atol=1e-2, rtol=1e-2)


def test_two_runs_are_bit_identical(triton_kernels):
    """No atomics: every output element is written by one program in a fixed order."""
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        tensors = [unit_rows(r, 40, generator) for r in (37, 37, 111, 111)]
        scale = torch.tensor(100.0, requires_grad=True)
        runs.append(
            loss_and_grads(lambda *t: fused_clip_loss_fn(*t[:4], t[4], 50, triton_kernels, 16, 32), tensors, scale)
        )
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_triton_is_exact_across_two_gloo_ranks_with_unequal_batches(triton_kernels, tmp_path):
    from tests.distributed import run_ranks
    from tests.ops.test_fused_loss import two_rank_grads

    runs = [("fused", "reference", 100.0, (16, 16)), ("fused", "triton", 100.0, (16, 16))]
    for reference, triton_run in run_ranks(two_rank_grads, 2, tmp_path, runs):
        for key in reference:
            assert_within(torch.tensor(triton_run[key]), torch.tensor(reference[key]), 100.0)


def test_tiles_are_powers_of_two_and_no_split_is_empty():
    launch = tc.Launch.plan(B=100, N=1000, D=300, tiles=(5, 200), splits=7)
    assert (launch.rows, launch.cols, launch.width) == (16, 128, 128)
    col_tiles = -(-1000 // launch.cols)
    assert launch.splits <= 7 and (launch.splits - 1) * launch.cols_per_split(1000) < 1000
    assert launch.splits * launch.cols_per_split(1000) >= 1000
    assert tc.Launch.plan(B=8, N=8, D=8, splits=None).splits == 1
    assert launch.splits <= col_tiles


def test_triton_on_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    """Kernels made for the GPU compiler (TRITON_INTERPRET unset when triton was imported) cannot take CPU tensors."""
    monkeypatch.setattr(tc, "INTERPRETED", False)
    monkeypatch.setenv("LILT_DS_KERNELS", "triton")
    builder.select.cache_clear()
    try:
        with pytest.raises(
            builder.KernelBuildError,
            match="LILT_DS_KERNELS=triton but the Triton kernel of the fused "
            "contrastive loss cannot be used on cpu tensors .*set "
            "TRITON_INTERPRET=1 before the process starts",
        ):
            builder.select("contrastive", "cpu")
    finally:
        builder.select.cache_clear()
