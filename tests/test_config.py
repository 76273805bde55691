import pytest

from lilt_ds.config import ConfigError, available_presets, load_config, parse_override


def test_every_preset_loads():
    for name in ["clip", "lit", "lilt", "lilt_ln", "lilt_bitfit", "lilt_lora", "demo"]:
        assert name in available_presets()
        cfg = load_config(name)
        assert cfg.mode in ("clip", "lit", "lilt")
        assert cfg.config_name == name


def test_overrides_dotted_alias_and_yaml_values():
    cfg = load_config("lilt", ["vision_encoder=small", "text_encoder=tiny", "train.lr=1e-4",
                               "model.text.unlock=[ln,top_k:2]", "data.image_root=null", "disable_wandb=False"])
    assert cfg.model.vision.name == "small" and cfg.model.text.name == "tiny"
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.text.unlock == ["ln", "top_k:2"]
    assert cfg.data.image_root is None
    assert cfg.logging.disable_wandb is False


def test_plus_adds_a_new_key_and_plain_unknown_key_fails_with_suggestions():
    cfg = load_config("lilt", ["+train.my_new_key=3", "+save_last_only=True"])
    assert cfg.train.my_new_key == 3 and cfg.checkpoint.save_last_only is True
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        load_config("lilt", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"\+train\.my_new_key"):
        load_config("lilt", ["train.my_new_key=3"])


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", "train.lr=[1,"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="malformed override"):
        parse_override(bad)


def test_unknown_preset_and_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config preset 'lit_ln'.*Presets:"):
        load_config("lit_ln")
    with pytest.raises(ConfigError, match=r"unknown mode 'frozen'.*clip, lit, lilt"):
        load_config("lilt", ["mode=frozen"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_preset_is_checked_against_the_schema(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("mode: lit\nmodel:\n  visoin: {name: tiny}\n")
    with pytest.raises(ConfigError, match=r"model\.visoin.*model\.vision"):
        load_config(str(path))
    path.write_text("mode: lit\nmodel:\n  vision: {name: tiny}\n")
    assert load_config(str(path)).model.vision.name == "tiny"


def test_a_saved_resolved_config_reloads_identically(tmp_path):
    from lilt_ds.config import save_config

    cfg = load_config("lilt", ["+train.my_new_key=3", "text_encoder=small"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg and again.config_name == "lilt"
