"""What a run reports (lilt_ds/run_logging.py): the loader's share of the step time in every log line and
steps.jsonl record, and the one warning when it is too large; the same scalars as TensorBoard events,
read back with TensorBoard's own reader; a real run on one gloo rank."""

import json

import pytest

from tests.conftest import tiny_trainer
from tests.distributed import run_ranks


def _refused(rank, world_size, out):
    from lilt_ds.errors import ConfigError

    try:
        tiny_trainer(out, "data.decode=device", "data.augment.preset=openclip")
    except ConfigError as err:
        return {"error": str(err)}
    return {"error": None}


def test_every_step_record_carries_the_data_wait_and_a_large_one_is_reported_once(logged_run):
    """The loader runs in the training process here (num_workers=0), so the steps do wait for it: a
    warning limit below that wait warns once (not at step 1, whose wait includes the start), with the
    remedies."""
    out = logged_run
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["data_wait"] < 1 for r in records)
    log = (out / "train.log").read_text()
    assert all(f"step {s} samples_seen" in log and "data_wait=" in log for s in (1, 2, 3, 4))
    warnings = [line for line in log.splitlines() if "the steps waited for data" in line]
    assert len(warnings) == 1 and "data.num_workers (now 0)" in warnings[0] and "data.decode=device" in warnings[0]
    assert "data.cache_locked_features=true" in warnings[0]


def test_decoding_on_the_device_is_refused_without_cuda_before_the_model_is_built(tmp_path):
    result = run_ranks(_refused, 1, tmp_path, str(tmp_path / "run"))[0]
    assert result["error"].startswith("data.decode = device decodes JPEGs with nvJPEG on a CUDA GPU")
    assert "this run's device is cpu: set data.decode=cpu" in result["error"]


def test_tensorboard_events_hold_the_logged_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = logged_run
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait", "memory_gib", "samples_seen"):
        logged = [(s.step, s.value) for s in events.Scalars(f"train/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], key
    assert results and "eval/txt_r1" in tags
    for key in ("txt_r1", "img_r1", "r_mean"):
        logged = [(s.step, s.value) for s in events.Scalars(f"eval/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in results], key
