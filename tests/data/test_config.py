"""The data section of the experiment config (lilt_ds/data/config.py)."""

import dataclasses

import pytest

from lilt_ds.data import DataError, eval_loader_settings, loader_settings, resolve_data_config
from lilt_ds.errors import LiltError
from lilt_ds.schema import DataSettings


def test_defaults_fill_missing_keys_without_sharing_state():
    cfg = resolve_data_config({"demo": {"n": 100}})
    assert dataclasses.asdict(cfg.demo) == {"n": 100, "eval_n": 500, "seed": 0, "size": 128}
    assert cfg.on_bad_sample == "error" and cfg.augment.randaugment == "rand-m7-n2"
    cfg.train_files.append("x.json")
    assert DataSettings().train_files == [] and resolve_data_config().train_files == []


def test_a_single_file_string_becomes_a_list():
    assert resolve_data_config({"train_files": "a.json"}).train_files == ["a.json"]


def test_files_and_shards_together_are_refused():
    with pytest.raises(DataError, match="data.train_files and data.train_shards are both set"):
        resolve_data_config({"train_files": ["a.json"], "train_shards": "/d/{0..1}.tar"})


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"max_length": 0}, r"data\.max_length = 0: expected an integer >= 1"),
        ({"eval_image_root": {"from": "/a"}}, r"data\.eval_image_root = "),
        ({"eval_file": 3}, r"data\.eval_file = 3: expected a path or null"),
        ({"train_files": [None]}, r"data\.train_files = \[None\]: expected a list of JSON, CSV/TSV or Parquet files"),
        ({"demo": {"size": 4}}, r"data\.demo\.size = 4: expected an integer >= 16"),
        ({"augment": {"randaugment": 7}}, r"data\.augment\.randaugment = 7: expected a timm RandAugment string"),
        ({"max_bad_fraction": True}, r"data\.max_bad_fraction = True"),
        ({"augment": {"scale": [0.9, 0.2]}}, r"data\.augment\.scale = \[0\.9, 0\.2\]: expected \[low, high\]"),
        ({"shuffle_bufer": 3}, r"unknown config key 'data\.shuffle_bufer'.*Closest valid keys: data\.shuffle_buffer"),
        ({"num_workers": "many"}, r"data\.num_workers = 'many': expected auto or an integer >= 0"),
        ({"pin_memory": "yes"}, r"data\.pin_memory = 'yes': expected auto, true or false"),
    ],
)
def test_bad_values_name_the_key(cfg, message):
    with pytest.raises(LiltError, match=message):
        resolve_data_config(cfg)


@pytest.mark.parametrize(
    "device, cpus, ranks, expected",
    [
        ("cpu", 64, 1, (2, False)),  # the CPU keeps the workers it always had, nothing pinned
        ("cuda", 16, 1, (8, True)),  # one GPU on 16 cores: at most 8 workers
        ("cuda", 96, 8, (8, True)),  # 8 GPUs on 96 cores: 12 each, at most 8
        ("cuda", 32, 8, (3, True)),  # 4 cores per rank: 3 workers and the rank's own process
        ("cuda", 8, 8, (1, True)),  # one core per rank: still one worker
    ],
)
def test_auto_workers_and_pinning_follow_the_device(device, cpus, ranks, expected):
    cfg = resolve_data_config({})
    assert (cfg.num_workers, cfg.pin_memory) == ("auto", "auto")
    assert loader_settings(cfg, device, cpus=cpus, ranks_here=ranks) == expected


def test_explicit_workers_and_pinning_are_obeyed_and_evaluation_stays_in_process_on_the_cpu():
    cfg = resolve_data_config({"num_workers": 5, "pin_memory": False})
    assert loader_settings(cfg, "cuda", cpus=64, ranks_here=1) == (5, False)
    assert eval_loader_settings(cfg, "cuda") == (5, False)
    assert eval_loader_settings(resolve_data_config({}), "cpu") == (0, False)
