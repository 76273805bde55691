"""--deepspeed_config takes a packaged name or a path (lilt_ds.ds_configs), from any directory."""

import json
import os

import pytest

from lilt_ds.ds_configs import FOLDER, ds_config_path, names
from lilt_ds.engine import load_ds_config
from lilt_ds.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_ships_every_config_and_the_checkout_links_to_them():
    assert names() == ["zero0", "zero1", "zero2", "zero2_fp16", "zero2_offload", "zero3", "zero3_nvme", "zero3_offload"]
    assert os.path.realpath(os.path.join(ROOT, "ds_configs")) == os.path.realpath(FOLDER)


@pytest.mark.parametrize("value", ["zero3_offload", "zero3_offload.json"])
def test_a_name_with_or_without_json_is_the_packaged_file_from_any_directory(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ds_config_path(value) == os.path.join(FOLDER, "zero3_offload.json")
    assert load_ds_config(value)["zero_optimization"]["stage"] == 3


def test_a_path_is_used_as_is_and_wins_over_a_name(tmp_path, monkeypatch):
    mine = tmp_path / "zero2.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert ds_config_path(str(mine)) == str(mine)
    monkeypatch.chdir(tmp_path)  # a file named like a packaged config, in the current directory
    assert load_ds_config("zero2.json")["zero_optimization"]["stage"] == 1
    assert load_ds_config("zero2")["zero_optimization"]["stage"] == 2  # no such file here: the name


@pytest.mark.parametrize("value", ["zero4", "zero4.json", "configs/zero2.json", "../zero2"])
def test_an_unknown_name_or_missing_path_lists_the_packaged_names(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_ds_config(value)
    message = str(error.value)
    assert message.startswith(f"ds_config {value} does not exist") and "path of a JSON file" in message
    assert ", ".join(names()) in message


def test_no_value_still_says_none_was_given():
    with pytest.raises(ConfigError, match="no ds_config given"):
        load_ds_config("")
