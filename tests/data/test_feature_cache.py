"""The locked-tower feature cache: rows equal the real tower's output for the same view, a changed
tower or transform rebuilds it, a killed build resumes, ranks build in parallel, bad configs are
refused at load, and LiT trains on it as it trains without it."""

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from lilt_ds.config import load_config
from lilt_ds.data import (
    CaptionDataset,
    build_eval_transform,
    build_train_transform,
    load_caption_files,
    resolve_data_config,
)
from lilt_ds.data.feature_cache import cache_locked_features
from lilt_ds.data.preprocessing.images import open_image, open_rgb
from lilt_ds.data.sample_rng import augmented
from lilt_ds.errors import ConfigError, LiltError
from lilt_ds.models import build_model
from tests.conftest import tiny_overrides, tiny_training_overrides
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOWER_CONFIG = {"name": "tiny", "image_size": 32}


def lit_model(seed=0):
    cfg = load_config("demo", tiny_overrides("lit", extra=[f"seed={seed}"]))
    return build_model(cfg, load_weights=False)


def dataset_and_settings(train_file, views=1, augment=None, cache="auto", on_bad_sample="error"):
    data = resolve_data_config(
        {
            "train_files": [train_file],
            "cache_locked_features": True,
            "cache_views": views,
            "index_cache": cache,
            "augment": augment or {},
            "on_bad_sample": on_bad_sample,
        }
    )
    model_mean = lit_model().vision
    transform = build_train_transform(32, model_mean.mean, model_mean.std, data.augment)
    table = load_caption_files(data.train_files, cache=None)
    return CaptionDataset(table, transform, seed=3, on_bad_sample=on_bad_sample), data


def build(dataset, data, model, batch_size=4, dtype=torch.float32):
    return cache_locked_features(dataset, model, data, TOWER_CONFIG, "cpu", dtype, batch_size, 0)


def tower_output(model, pixels):
    with torch.no_grad():
        return model.vision.eval()(pixels)


@pytest.mark.parametrize("views", [1, 2])
def test_cached_rows_equal_the_towers_output_for_the_same_view_bit_for_bit(caption_file, views, monkeypatch):
    dataset, data = dataset_and_settings(caption_file(n=10), views)
    model = lit_model()
    report = build(dataset, data, model)
    assert report["built"] == 10 * views and report["blocks"] == 3 * views
    eval_transform = build_eval_transform(32, model.vision.mean, model.vision.std)

    def decoding_forbidden(path):
        raise AssertionError(f"decoded {path} although its features are cached")

    def view_pixels(view, entry):
        image = open_rgb(dataset.table.image_path(entry))
        return (
            eval_transform(image)
            if views == 1
            else augmented(dataset.transform.with_normalize(), image, dataset.seed, view, entry, entry)
        )

    # the tower on the build's blocks of 4 (a GEMM rounds by the batch's shape, so another batch
    # composition agrees to about 1e-6 only)
    expected = {
        view: torch.cat(
            [
                tower_output(model, torch.stack([view_pixels(view, e) for e in range(b, min(b + 4, 10))]))
                for b in range(0, 10, 4)
            ]
        )
        for view in range(views)
    }
    monkeypatch.setattr("lilt_ds.data.caption_dataset.open_image", decoding_forbidden)
    for epoch in range(3):
        view = epoch % views
        for entry in range(10):
            item = dataset[(epoch, entry)]
            assert "image" not in item and item["index"] == entry
            assert torch.equal(item["image_features"], expected[view][entry])
            alone = tower_output(model, view_pixels(view, entry)[None])[0]
            torch.testing.assert_close(item["image_features"], alone, rtol=1e-5, atol=1e-5)
    if views == 2:  # two different augmented views, not one repeated
        assert not torch.equal(dataset[(0, 0)]["image_features"], dataset[(1, 0)]["image_features"])


def test_a_bf16_run_caches_the_bf16_towers_output_and_leaves_the_model_as_it_was(caption_file):
    import copy

    dataset, data = dataset_and_settings(caption_file(n=4))
    model = lit_model()
    assert build(dataset, data, model, dtype=torch.bfloat16)["built"] == 4
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # DeepSpeed casts it later
    eval_transform = build_eval_transform(32, model.vision.mean, model.vision.std)
    pixels = torch.stack([eval_transform(open_rgb(dataset.table.image_path(i))) for i in range(4)])
    with torch.no_grad():
        expected = copy.deepcopy(model.vision).to(torch.bfloat16).eval()(pixels.bfloat16()).float()
    assert torch.equal(torch.stack([dataset[i]["image_features"] for i in range(4)]), expected)
    assert build(dataset, data, model)["built"] == 4  # fp32 now: another precision, rebuilt


def test_a_changed_tower_or_transform_rebuilds_the_cache_and_an_unchanged_one_is_reused(caption_file, caplog):
    train_file = caption_file(n=6)
    dataset, data = dataset_and_settings(train_file, views=2)
    model = lit_model()
    assert build(dataset, data, model)["built"] == 12
    assert build(dataset, data, model)["built"] == 0  # found complete
    folder = build(dataset, data, model)["folder"]
    assert os.path.dirname(folder) == os.path.dirname(train_file)  # beside the caption file

    with torch.no_grad():
        model.vision.trunk.blocks[0].mlp.fc1.bias.add_(0.5)
    with caplog.at_level(logging.WARNING, logger="lilt_ds.data"):
        assert build(dataset, data, model)["built"] == 12
    assert "built by another image tower" in caplog.text
    image = open_rgb(dataset.table.image_path(1))
    expected = tower_output(model, augmented(dataset.transform.with_normalize(), image, dataset.seed, 1, 1, 1)[None])[0]
    torch.testing.assert_close(dataset[(1, 1)]["image_features"], expected, rtol=1e-5, atol=1e-5)

    caplog.clear()
    flipped, data = dataset_and_settings(train_file, views=2, augment={"hflip": False})
    with caplog.at_level(logging.WARNING, logger="lilt_ds.data"):
        assert build(flipped, data, model)["built"] == 12
    assert "built with other image preprocessing" in caplog.text
    folder = build(flipped, data, model)["folder"]
    os.unlink(os.path.join(folder, "features.f32"))  # a folder emptied by hand is started again
    assert build(flipped, data, model)["built"] == 12
    assert build(flipped, data, model)["built"] == 0


@pytest.mark.slow
def test_a_killed_build_resumes_at_its_first_missing_block(caption_file, tmp_path):
    train_file = caption_file(n=12)
    script = textwrap.dedent(f"""
        import time
        from tests.data.test_feature_cache import build, dataset_and_settings, lit_model
        dataset, data = dataset_and_settings({train_file!r})
        model = lit_model()
        model.vision.register_forward_hook(lambda *args: time.sleep(0.5))  # slow enough to be caught
        build(dataset, data, model, batch_size=2)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    dataset, data = dataset_and_settings(train_file)
    from lilt_ds.data.feature_cache import cache_location

    status_path = os.path.join(cache_location([train_file], None, 1, "auto"), "status.u8")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if os.path.exists(status_path) and 0 < np.count_nonzero(np.fromfile(status_path, np.uint8)) < 12:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = np.count_nonzero(np.fromfile(status_path, np.uint8))
    assert 0 < written < 12, "the build was not caught half way"

    model = lit_model()
    report = build(dataset, data, model, batch_size=2)
    assert report["built"] == 12 - written
    fresh, fresh_data = dataset_and_settings(train_file, cache=str(tmp_path / "fresh"))
    build(fresh, fresh_data, model, batch_size=2)
    for entry in range(12):
        assert torch.equal(dataset[entry]["image_features"], fresh[entry]["image_features"])


def _build_on_ranks(rank, world_size, train_file, cache):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    dataset, data = dataset_and_settings(train_file, views=2, cache=cache)
    report = build(dataset, data, lit_model(), batch_size=2)
    rows = np.stack([dataset[(epoch, i)]["image_features"].numpy() for epoch in (0, 1) for i in range(len(dataset))])
    return {"blocks": report["blocks"], "built": report["built"], "rows": hashlib.sha256(rows.tobytes()).hexdigest()}


@pytest.mark.slow
def test_ranks_build_their_shares_in_parallel_into_one_cache(caption_file, tmp_path):
    train_file = caption_file(n=10)
    ranks = run_ranks(_build_on_ranks, 2, tmp_path, train_file, str(tmp_path / "shared"))
    assert all(r["blocks"] > 0 for r in ranks) and sum(r["built"] for r in ranks) == 20
    dataset, data = dataset_and_settings(train_file, views=2, cache=str(tmp_path / "alone"))
    build(dataset, data, lit_model(), batch_size=2)
    rows = np.stack([dataset[(epoch, i)]["image_features"].numpy() for epoch in (0, 1) for i in range(10)])
    assert {r["rows"] for r in ranks} == {hashlib.sha256(rows.tobytes()).hexdigest()}


def test_undecodable_images_stop_the_build_or_are_replaced_when_skipped(caption_file, tmp_path):
    train_file = caption_file(n=6)
    dataset, _ = dataset_and_settings(train_file)
    with open(dataset.table.image_path(2), "wb") as handle:
        handle.write(b"not a jpeg")
    from lilt_ds.data import DataError

    dataset, data = dataset_and_settings(train_file)
    with pytest.raises(DataError, match=r"images/train.json_2.jpg.*cannot decode.*on_bad_sample=skip"):
        build(dataset, data, lit_model())
    dataset, data = dataset_and_settings(train_file, on_bad_sample="skip", cache=str(tmp_path / "skip"))
    build(dataset, data, lit_model())
    item = dataset[(0, 2)]
    assert item["index"] != 2 and [b.index for b in item["bad_samples"]] == [2]
    assert "when the feature cache" in item["bad_samples"][0].reason


@pytest.mark.parametrize(
    "overrides, message",
    [
        (tiny_overrides("clip"), r"mode=clip .* trains it"),
        (tiny_overrides("lilt", vision_unlock=["ln"]), r"mode=lilt with model.vision.unlock=\['ln'\] trains it"),
        (tiny_overrides("lit", extra=["model.vision.patch_dropout=0.5"]), r"patch_dropout=0.5: patch dropout draws"),
        (tiny_overrides("lit", extra=["data.index_cache=null"]), r"data.index_cache is null"),
        (tiny_overrides("lit", extra=["data.cache_views=0"]), r"data.cache_views = 0: expected an integer >= 1"),
    ],
)
def test_configs_the_cache_cannot_serve_are_refused_at_load(overrides, message):
    with pytest.raises(LiltError, match=message):
        load_config("demo", [*overrides, "data.cache_locked_features=true"])


def test_shards_are_refused_by_name(caption_file, tmp_path):
    from lilt_ds.data import write_shards

    pattern = write_shards([caption_file(n=2)], str(tmp_path / "shards"), 1)["train_shards"]
    with pytest.raises(ConfigError, match=r"data.train_shards streams samples"):
        load_config("demo", [*tiny_overrides("lit"), "data.cache_locked_features=true", f"data.train_shards={pattern}"])


def test_exact_accumulation_of_cached_features_equals_one_batch():
    """The loop's exact accumulation re-encodes micro-batches of cached features as of images."""
    from lilt_ds.losses import ContrastiveLoss, exact_accumulation_step
    from lilt_ds.models import encode_batch

    model = lit_model().eval()  # no dropout: one batch and its halves draw none
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image_features": torch.randn(8, model.vision.width, generator=generator),
        "input_ids": torch.randint(5, 100, (8, 6), generator=generator),
        "attention_mask": torch.ones(8, 6, dtype=torch.long),
    }
    trained = [p for p in model.parameters() if p.requires_grad]
    ContrastiveLoss()(*encode_batch(model, batch)).backward()
    whole = [p.grad.clone() for p in trained]
    model.zero_grad()
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    exact_accumulation_step(model, halves, ContrastiveLoss(), lambda loss: loss.backward())
    assert model.vision_proj.weight.grad is not None
    for expected, param in zip(whole, trained):
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lit_on_cached_features_trains_as_lit_on_images(tmp_path, monkeypatch):
    """fp32, one view (the eval resize) against a run whose augmentation is that resize: the same
    losses step for step, and the cached run's epochs neither decode an image nor run the tower."""
    import json

    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer
    from tests.test_train import _lilt_ds_logging_restored

    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["bf16"] = {"enabled": False}
    ds_path = tmp_path / "zero2_fp32.json"
    ds_path.write_text(json.dumps(ds))
    base = tiny_training_overrides(tmp_path)
    base = [o for o in base if not o.startswith(("mode=", "model.vision.unlock", "model.text.unlock"))]
    base += [
        "mode=lit",
        "model.vision.unlock=[]",
        "model.text.unlock=[]",
        "train.max_steps=null",
        "train.epochs=2",
        "data.demo={n: 16, eval_n: 8, seed: 0, size: 32}",
        "eval.every_epochs=0",
    ]

    def losses(name, extra):
        cfg = load_config("demo", [*base, *extra, f"output_dir={tmp_path / name}"])
        trainer = Trainer(cfg, str(ds_path))
        calls = {"tower": 0, "decode": 0}
        trainer.model.vision.register_forward_hook(lambda *args: calls.__setitem__("tower", calls["tower"] + 1))
        real_open = open_image

        def counting_open(path):
            calls["decode"] += 1
            return real_open(path)

        out = []
        with monkeypatch.context() as patch:  # this run's decodes only (the next run's cache build decodes too)
            patch.setattr("lilt_ds.data.caption_dataset.open_image", counting_open)
            for epoch in range(2):
                trainer.epoch = epoch
                for batch in trainer.loader:
                    out.append(trainer.optimizer_step([trainer.to_device(batch)]))
        trainer.engine.destroy()
        return out, calls

    with process_group_scope(), _lilt_ds_logging_restored():
        plain, plain_calls = losses("plain", ["data.augment.preset=none"])
        cached, cached_calls = losses("cached", ["data.cache_locked_features=true"])
    assert len(plain) == len(cached) == 8
    assert plain_calls == {"tower": 8, "decode": 32}
    assert cached_calls == {"tower": 0, "decode": 0}
    np.testing.assert_allclose(cached, plain, rtol=1e-5)  # batches of 4 against blocks of 8
