"""benchmarks/gpu_check.py cannot rot: its reduced run (the CPU-runnable parts, tiny models, the Triton
kernel in Triton's interpreter) passes every check a CPU can run and writes its summary."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_gpu_check_passes_what_a_cpu_can_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--reduced",
                             "--output", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["check"]: r["status"] for r in summary["results"]}
    assert status == {"environment": "pass", "kernels": "pass", "fused loss": "pass", "fused loss speed": "pass",
                      "host syncs": "skip", "training zero2": "pass", "resume": "pass", "training zero3": "skip",
                      "memory": "pass", "throughput": "pass", "efficiency": "pass",
                      "feature cache": "pass"}
    table = (tmp_path / "summary.md").read_text()
    assert "(reduced: CPU, tiny models)" in table and "| fused loss | pass |" in table
    assert "Triton" in next(r["summary"] for r in summary["results"] if r["check"] == "kernels")
    efficiency = next(r["summary"] for r in summary["results"] if r["check"] == "efficiency")
    assert "patch_dropout:" in efficiency and "vision tower activations" in efficiency
    cache = next(r["summary"] for r in summary["results"] if r["check"] == "feature cache")
    assert "with the feature cache:" in cache and "build per million images" in cache
