"""LILT_DS_KERNELS selects the implementation; an impossible build falls back (auto) or raises (fused)."""

import logging

import pytest

from lilt_ds.ops import FusedContrastiveLoss, KernelBuildError, builder


@pytest.fixture
def fresh_selection(monkeypatch):
    builder.select.cache_clear()
    yield monkeypatch
    builder.select.cache_clear()


@pytest.fixture
def impossible_build(fresh_selection, tmp_path):
    fresh_selection.setattr(builder, "KERNELS_DIR", tmp_path / "no_kernels")
    return fresh_selection


def test_reference_switch_never_builds_and_logs_it(fresh_selection, caplog):
    fresh_selection.setenv("LILT_DS_KERNELS", "reference")
    fresh_selection.setattr(builder, "build_extension", lambda *a, **k: pytest.fail("must not build"))
    with caplog.at_level(logging.INFO, logger="lilt_ds"):
        loss = FusedContrastiveLoss()
    assert loss.implementation("cpu") == "reference"
    assert [r.getMessage() for r in caplog.records] == [
        "lilt_ds.ops: contrastive on cpu tensors runs the PyTorch chunked loss (lilt_ds.losses.chunked_clip_loss_fn) "
        "(LILT_DS_KERNELS=reference)"
    ]


def test_failed_build_falls_back_with_one_log_line(impossible_build, caplog):
    impossible_build.delenv("LILT_DS_KERNELS", raising=False)
    with caplog.at_level(logging.INFO, logger="lilt_ds"):
        assert FusedContrastiveLoss().implementation("cpu") == "reference"
        FusedContrastiveLoss()  # decided once per process
    (record,) = caplog.records
    assert "runs the PyTorch chunked loss" in record.getMessage()
    assert "C++ kernel unavailable: FileNotFoundError" in record.getMessage()


def test_forced_fused_that_cannot_build_is_an_error(impossible_build):
    impossible_build.setenv("LILT_DS_KERNELS", "fused")
    with pytest.raises(KernelBuildError, match="LILT_DS_KERNELS=fused but the C\\+\\+ kernel of the fused contrastive "
                                               "loss cannot be used on cpu tensors"):
        FusedContrastiveLoss()


def test_unknown_switch_value_is_rejected(fresh_selection):
    fresh_selection.setenv("LILT_DS_KERNELS", "fast")
    with pytest.raises(ValueError, match="LILT_DS_KERNELS='fast' is not valid: use one of reference, fused, triton"):
        builder.select("contrastive")


def test_build_command_reports_the_implementation(fresh_selection, capsys):
    from lilt_ds.ops.__main__ import main

    fresh_selection.setenv("LILT_DS_KERNELS", "reference")
    assert main(["--build"]) == 0
    assert capsys.readouterr().out.startswith("contrastive on cpu: reference -- PyTorch chunked loss")
