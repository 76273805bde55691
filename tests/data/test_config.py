"""The data section of the experiment config (lilt_ds/data/config.py)."""

import pytest

from lilt_ds.data import DATA_DEFAULTS, DataError, resolve_data_config


def test_defaults_fill_missing_keys_without_sharing_state():
    cfg = resolve_data_config({"demo": {"n": 100}})
    assert cfg["demo"] == {"n": 100, "eval_n": 500, "seed": 0, "size": 128}
    assert cfg["on_bad_sample"] == "error" and cfg["randaugment"] == "rand-m7-n2"
    cfg["train_files"].append("x.json")
    assert DATA_DEFAULTS["train_files"] == [] and resolve_data_config()["train_files"] == []


def test_a_single_file_string_becomes_a_list():
    assert resolve_data_config({"train_files": "a.json"})["train_files"] == ["a.json"]


@pytest.mark.parametrize("cfg, message", [
    ({"max_length": 0}, r"data\.max_length = 0: expected an integer >= 1"),
    ({"eval_image_root": {"from": "/a"}}, r"data\.eval_image_root = "),
    ({"eval_file": 3}, r"data\.eval_file = 3: expected a path or null"),
    ({"train_files": [None]}, r"data\.train_files = \[None\]: expected a list of JSON file paths"),
    ({"demo": {"size": 4}}, r"data\.demo\.size = 4: expected an integer >= 16"),
    ({"randaugment": 7}, r"data\.randaugment = 7: expected a timm RandAugment string"),
    ({"max_bad_fraction": True}, r"data\.max_bad_fraction = True"),
])
def test_bad_values_name_the_key(cfg, message):
    with pytest.raises(DataError, match=message):
        resolve_data_config(cfg)
