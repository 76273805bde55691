"""launch/plot_run.py (lilt_ds/tools/run_plots.py): a real run's curves, and two runs on one chart."""

import json
import os
import shutil
import subprocess
import sys

from PIL import Image

from lilt_ds.tools.run_plots import RECALL, STEP_PANELS, plot_runs, read_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_panel_draws_the_run_s_records(logged_run, tmp_path):
    other = tmp_path / "other"  # a second run: the same records, the loss halved
    shutil.copytree(logged_run, other, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    steps = [json.loads(line) for line in (other / "steps.jsonl").read_text().splitlines()]
    (other / "steps.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] / 2}) + "\n" for r in steps))
    runs = [read_run(str(logged_run)), read_run(str(other))]
    figure = plot_runs(runs, str(tmp_path / "curves.png"))
    panels = figure.axes
    for ax, (key, _) in zip(panels, STEP_PANELS):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["run", "other"]
        for line, run in zip(lines, runs):
            assert list(line.get_xdata()) == [r["step"] for r in run.steps]
            assert list(line.get_ydata()) == [r[key] for r in run.steps]
    recall = panels[len(STEP_PANELS)].get_lines()
    results = runs[0].results
    assert results and len(recall) == 2 * len(RECALL)
    assert list(recall[0].get_ydata()) == [r["txt_r1"] for r in results]
    image = Image.open(tmp_path / "curves.png")
    assert image.size == (1500, 800) and len(set(image.convert("L").getdata())) > 10  # drawn, not blank


def test_the_command_writes_beside_the_run_and_names_a_folder_without_records(logged_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(logged_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    command = [sys.executable, os.path.join(ROOT, "launch", "plot_run.py")]
    done = subprocess.run([*command, str(run)], capture_output=True, text=True)
    assert done.returncode == 0 and (run / "curves.png").is_file(), done.stderr[-2000:]
    missing = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 1 and f"error: {tmp_path} has no steps.jsonl" in missing.stderr + missing.stdout
