"""benchmarks/gpu_check.py cannot rot: without a GPU, its reduced run (the same checks and commands
as on a GPU, tiny models; the Triton kernel in Triton's interpreter) passes every check a CPU can
run, skips the GPU-only ones with their reason and writes its summary."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_reduced_gpu_check_passes_what_a_cpu_can_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--reduced", "--output", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["check"]: r["status"] for r in summary["results"]}
    assert status == {
        "environment": "pass",
        "kernels": "pass",
        "fused loss": "pass",
        "fused loss speed": "pass",
        "host syncs": "skip",
        "training zero2": "pass",
        "resume": "pass",
        "training zero3": "pass",
        "memory": "pass",
        "throughput": "pass",
        "efficiency": "pass",
        "feature cache": "pass",
        "loader": "pass",
    }
    found = {r["check"]: r["summary"] for r in summary["results"]}
    assert found["host syncs"].startswith("GPU only:")
    table = (tmp_path / "summary.md").read_text()
    assert "(reduced: tiny models)" in table and "| fused loss | pass |" in table
    assert "Triton" in found["kernels"]
    # the full path's flags: both modes and both implementations, the loader row, the compiled variant
    assert all(row in found["throughput"] for row in ("clip ours ZeRO-2", "clip plain", "lilt"))
    assert "compiled:" in found["efficiency"] and "patch_dropout:" in found["efficiency"]
    assert "vision tower activations" in found["efficiency"]
    assert "with the feature cache:" in found["feature cache"] and "build per million images" in found["feature cache"]
    assert "x OpenCLIP" in found["loader"] and found["loader"].endswith("data.decode=device: GPU only")
    workdir = tmp_path / next(p for p in os.listdir(tmp_path) if p.startswith("work-"))
    for stage in ("zero2", "zero3"):  # through the deepspeed launcher, as on a GPU
        assert "-m deepspeed.launcher.launch" in (workdir / f"train-{stage}.log").read_text()
