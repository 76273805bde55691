"""Keeping the best checkpoint and stopping early (lilt_ds/tracking.py, the trainer's watch): the metric
bookkeeping, the checks at config load, and a real run on one gloo rank."""

import json
import os

import pytest

from lilt_ds.config import load_config
from lilt_ds.errors import LiltError
from lilt_ds.tracking import MetricWatch
from tests.conftest import tiny_training_overrides
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_watch_keeps_the_best_value_and_counts_evaluations_since():
    watch = MetricWatch("r_mean", min_delta=0.5)
    outcomes = [watch.update({"r_mean": v}, step) for step, v in enumerate([10.0, 12.0, 12.4, 11.0, 13.0], 1)]
    assert outcomes == [True, True, False, False, True]  # 12.4 is within min_delta of 12
    assert (watch.best, watch.best_step, watch.stale) == (13.0, 5, 0)
    assert watch.update({"txt_r1": 50.0}, 6) is None and watch.stale == 0  # not measured: no count
    again = MetricWatch("r_mean")
    again.load_state_dict(watch.state_dict())
    assert again.state_dict() == watch.state_dict()
    other = MetricWatch("txt_r1")
    other.load_state_dict(watch.state_dict())  # another metric now: starts afresh
    assert other.best_step is None


def config(tmp_path, *extra):
    return load_config("lilt", tiny_training_overrides(tmp_path, list(extra)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["checkpoint.keep_best=loss"],
            r"checkpoint\.keep_best = 'loss' is not an evaluation metric: use one of txt_r1",
        ),
        (
            ["train.early_stopping={metric: zeroshot_top1}"],
            r"train\.early_stopping\.metric = 'zeroshot_top1', but this run never measures it: it needs "
            r"eval\.classification\.data",
        ),
        (
            ["checkpoint.keep_best=r_mean", "eval.every_epochs=0"],
            r"checkpoint\.keep_best = 'r_mean', but this run never measures it: it needs held-out retrieval data",
        ),
        (["train.early_stopping={metric: r_mean, patience: 0}"], r"train\.early_stopping\.patience"),
    ],
)
def test_a_metric_the_run_cannot_watch_stops_the_config_load(tmp_path, overrides, message):
    with pytest.raises(LiltError, match=message):
        config(tmp_path, *overrides)


def _run(rank, world_size, out):
    from lilt_ds.checkpoint import resolve_checkpoint
    from lilt_ds.export import load_trained
    from lilt_ds.train import Trainer

    cfg = config(
        out,
        f"output_dir={out}",
        "train.max_steps=8",
        "eval.every_steps=1",
        "checkpoint.keep_best=r_mean",
        "checkpoint.keep_last=1",
        "train.early_stopping={metric: txt_r1, patience: 2, min_delta: 100}",  # only the first counts
    )
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"))
    trainer.run()
    trainer.engine.destroy()
    load_trained(os.path.join(out, "best"))  # what export and launch/evaluate.py take
    return {"steps": trainer.step, "best": resolve_checkpoint(os.path.join(out, "best"))[1]}


@pytest.mark.slow
def test_a_run_keeps_its_best_checkpoint_and_stops_when_the_metric_stalls(tmp_path):
    out = tmp_path / "run"
    result = run_ranks(_run, 1, tmp_path, str(out))[0]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "r_mean" in r]
    assert [r["step"] for r in evaluations] == [1, 2, 3]  # evaluations 2 and 3 did not count: patience 2
    best_step = max(evaluations, key=lambda r: (r["r_mean"], -r["step"]))["step"]  # the first of the best
    assert result == {"steps": 3, "best": f"step{best_step}"}
    stop = records[-1]
    assert stop["early_stopped"] is True and (stop["metric"], stop["best_step"], stop["stale"]) == ("txt_r1", 1, 2)
    assert stop["best"] == evaluations[0]["txt_r1"]
    assert "early stopping at step 3: txt_r1 has not improved for 2 evaluations" in (out / "train.log").read_text()
    tags = {p for p in os.listdir(out / "checkpoints") if p.startswith("step")}
    assert tags == {f"step{best_step}", "step3"}  # keep_last=1 keeps the newest, and the best beside it
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert (best["tag"], best["metric"], best["step"]) == (f"step{best_step}", "r_mean", best_step)
    assert (out / "trainable.safetensors").exists()  # the run ended as runs end: exported
