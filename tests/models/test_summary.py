import os
import re
import subprocess
import sys

import pytest

from lilt_ds.cli.summary import main as summary
from lilt_ds.config import load_config
from lilt_ds.models import build_model, trainable_summary
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def total_percent(output: str) -> float:
    line = next(row for row in output.splitlines() if row.startswith("total"))
    return float(re.search(r"([\d.]+)%$", line).group(1))


# the LilT paper's base/base, 256 px figures (ranges from the issue)
@pytest.mark.parametrize(
    "preset,low,high",
    [
        ("lilt", 6.5, 7.5),
        ("lilt_small", 6.5, 7.5),
        ("lilt_ln", 0.0, 0.5),
        ("lilt_bitfit", 0.0, 0.5),
        ("lit", 50, 60),
        ("clip", 100, 100),
    ],
)
def test_summary_of_base_presets(preset, low, high, capsys):
    summary(["--config", preset])
    out = capsys.readouterr().out
    assert "vision=base text=base image_size=256" in out
    assert low <= total_percent(out) <= high


def test_summary_counts_match_the_parameters():
    model = build_model(load_config("lilt", tiny_overrides(vision_unlock=["ln"], text_unlock=["bitfit"])))
    counts = trainable_summary(model)
    assert counts["total"]["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["vision"]["trainable"] == sum(p.numel() for n, p in model.vision.named_parameters() if "norm" in n)
    assert (
        counts["heads"]["trainable"]
        == counts["heads"]["total"]
        == sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vision.", "text.")))
    )


@pytest.mark.slow
def test_summary_command_runs_offline_with_overrides():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "summary.py"),
            "--config",
            "lilt",
            "--overrides",
            "vision_encoder=large",
            "text_encoder=small",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "vision=large text=small" in out and out.count("\n") >= 5
