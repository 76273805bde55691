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
    with pytest.raises(
        KernelBuildError,
        match="LILT_DS_KERNELS=fused but the C\\+\\+ kernel of the fused contrastive "
        "loss cannot be used on cpu tensors",
    ):
        FusedContrastiveLoss()


def test_unknown_switch_value_is_rejected(fresh_selection):
    fresh_selection.setenv("LILT_DS_KERNELS", "fast")
    with pytest.raises(ValueError, match="LILT_DS_KERNELS='fast' is not valid: use one of reference, fused, triton"):
        builder.select("contrastive")


def test_build_command_reports_the_implementation(fresh_selection, capsys):
    from lilt_ds.cli.build_kernels import main

    fresh_selection.setenv("LILT_DS_KERNELS", "reference")
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("contrastive on cpu: reference -- PyTorch chunked loss")


@pytest.mark.slow
def test_a_wheel_ships_the_kernel_sources_and_the_builder_finds_them_there(tmp_path):
    """A non-editable install (pip install .) must build the fused kernel too, not fall back quietly."""
    import os
    import subprocess
    import sys
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), root],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lilt_ds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lilt_ds/ops/kernels/fused_contrastive.cpp" in names
    shipped = tmp_path / "site" / "lilt_ds" / "ops"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "from lilt_ds.ops.builder import KERNELS_DIR; print(KERNELS_DIR)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert found.stdout.strip().endswith(str(shipped / "kernels")), found.stdout + found.stderr[-2000:]
