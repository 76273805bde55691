import dataclasses
import os

import pytest

from lilt_ds import schema
from lilt_ds.config import load_config
from lilt_ds.errors import ConfigError, LiltError
from lilt_ds.presets import available_presets, parse_override, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_preset_loads():
    for name in ["clip", "lit", "lilt", "lilt_ln", "lilt_bitfit", "lilt_lora", "lilt_small", "demo"]:
        assert name in available_presets()
        cfg = load_config(name)
        assert cfg.mode in ("clip", "lit", "lilt")
        assert cfg.config_name == name


def test_the_small_data_preset_is_lilt_with_a_recipe():
    small, lilt = load_config("lilt_small"), load_config("lilt")
    assert small.mode == lilt.mode and small.model == lilt.model  # the same towers and unlock sets
    scale = small.train.lr_scale
    assert scale.vision == scale.text > scale.heads == 1  # the towers' few parameters take larger steps
    assert small.checkpoint.keep_best == "r_mean" and small.eval.every_epochs == 1
    assert small.data.augment.preset == "none" and lilt.data.augment.preset == "lilt"  # the paper preset as it was


def test_overrides_dotted_alias_and_yaml_values():
    cfg = load_config(
        "lilt",
        [
            "vision_encoder=small",
            "text_encoder=tiny",
            "train.lr=1e-4",
            "model.text.unlock=[ln,top_k:2]",
            "data.image_root=null",
            "disable_wandb=False",
        ],
    )
    assert cfg.model.vision.name == "small" and cfg.model.text.name == "tiny"
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.text.unlock == ["ln", "top_k:2"]
    assert cfg.data.image_root is None
    assert cfg.logging.disable_wandb is False


def test_plus_adds_a_new_key_and_plain_unknown_key_fails_with_suggestions():
    cfg = load_config("lilt", ["+train.my_new_key=3", "+save_last_only=True"])
    assert cfg.extras == {"train.my_new_key": 3} and cfg.checkpoint.save_last_only is True
    assert cfg.to_dict()["train"]["my_new_key"] == 3  # saved with the run, where the user put it
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
    with pytest.raises(ConfigError, match=r"mode = 'frozen': expected one of clip, lit, lilt"):
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
    cfg = load_config("lilt", ["+train.my_new_key=3", "text_encoder=small"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg and again.config_name == "lilt"


# -------------------------------------------------------------------------------- one validation pass
WRONG_FOR_NULL_DEFAULT = {  # keys whose default is null: a value of a type they never take
    "output_dir": 5,
    "checkpoint.keep_last": "x",
    "data.samples_per_epoch": "many",
    "data.clean_captions": "yes please",
    "checkpoint.keep_best": 5,
    "train.early_stopping.metric": 5,
    "data.max_length": "long",
    "data.eval_max_length": "long",
    "data.table.separator": 5,
    "eval.every_steps": "often",
    "model.init_logit_scale": "big",
    "model.init_logit_bias": "big",
    "model.text.tokenizer": 5,
    "model.vision.lora.target_modules": 5,
    "model.text.lora.target_modules": 5,
    "loss.tile_rows": "x",
    "loss.tile_cols": "x",
    "data.train_shards": 5,
    "data.image_root": 5,
    "data.eval_file": 5,
    "data.eval_image_root": 5,
    "train.max_steps": "x",
    "checkpoint.every_steps": "x",
    "logging.wandb_run_name": 5,
    "data.augment.scale": "big",
    "data.augment.ratio": 5,
    "data.augment.interpolation": 5,
    "data.augment.hflip": 5,
    "data.augment.randaugment": 5,
    "data.augment.color_jitter": "x",
    "data.augment.grayscale": "x",
    "model.vision.layer_decay": "x",
    "model.text.layer_decay": "x",
    "model.init_from": 5,
    "model.init_weights": 5,
    "model.image_size": "x",
    "eval.classification.data": 5,
    "eval.classification.image_root": 5,
    "eval.classification.classnames": 5,
}
WRONG_FOR_AUTO = {"data.num_workers": "many", "data.pin_memory": "sometimes", "data.index_cache": 5}


def wrong_value(key, default):
    if key in WRONG_FOR_NULL_DEFAULT:
        return WRONG_FOR_NULL_DEFAULT[key]
    if key in WRONG_FOR_AUTO:
        return WRONG_FOR_AUTO[key]
    if isinstance(default, bool) or isinstance(default, (str, list)):
        return 5
    return "x"  # numbers


def test_every_key_of_the_schema_refuses_a_value_of_the_wrong_type_naming_the_key():
    keys = schema.dotted_keys()
    assert len(keys) > 60 and set(WRONG_FOR_NULL_DEFAULT) <= set(keys)
    for key in keys:
        default = schema.get_key(schema.ExperimentConfig(), key)
        if default is None:
            assert key in WRONG_FOR_NULL_DEFAULT, f"{key} defaults to null: say what a wrong value for it is"
        value = wrong_value(key, default)
        with pytest.raises(LiltError) as error:
            load_config("lilt", [f"{key}={value}"])
        assert f"{key} = " in str(error.value), (key, value, str(error.value))


def test_every_key_has_its_help_and_a_check_that_names_what_it_accepts():
    for cls in (
        schema.ExperimentConfig,
        schema.ModelSettings,
        schema.VisionSettings,
        schema.TextSettings,
        schema.LoraSettings,
        schema.DataSettings,
        schema.AugmentSettings,
        schema.TrainSettings,
    ):
        for f in schema.user_fields(cls):
            assert f.metadata["help"], (cls.__name__, f.name)
            if not schema.is_section(f):
                assert schema.field_rule(cls, f).text != "a value", (cls.__name__, f.name)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.lr_scale=2.0",
            r"train\.lr_scale = 2\.0 in override 'train\.lr_scale=2\.0': expected a mapping of "
            r"vision, text, heads",
        ),
        ("train.lr_scale={audio: 2.0}", r"unknown config key 'train\.lr_scale\.audio'"),
        (
            "train.lr_scale={vision: 1.0, text: 1.0, heads: 1.0, audio: 2.0}",
            r"unknown config key 'train\.lr_scale\.audio'",
        ),
        ("train.lr_scale={vision: fast}", r"train\.lr_scale\.vision = 'fast': expected a number > 0"),
        ("data.demo=[1, 2]", r"data\.demo = \[1, 2\] in override .*: expected a mapping of n, eval_n, seed, size"),
        ("model.vision.lora={rank: 0}", r"model\.vision\.lora\.rank = 0: expected an integer >= 1"),
    ],
)
def test_a_key_of_a_nested_map_is_a_key_like_any_other(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("lilt", [override])


def test_a_mapping_given_to_a_section_keeps_the_keys_it_does_not_name():
    cfg = load_config("lilt", ["train.lr_scale={vision: 0.5}", "data.demo={n: 48}"])
    assert dataclasses.asdict(cfg.train.lr_scale) == {"vision": 0.5, "text": 1.0, "heads": 1.0}
    assert (cfg.data.demo.n, cfg.data.demo.eval_n) == (48, 500)


def test_a_loaded_config_is_typed_and_frozen():
    cfg = load_config("lilt", ["train.lr=1"])
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train, schema.TrainSettings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 2.0
    changed = schema.replace_keys(cfg, {"train.lr": 2.0, "output_dir": "/tmp/x"})
    assert (changed.train.lr, changed.output_dir, cfg.train.lr, cfg.output_dir) == (2.0, "/tmp/x", 1.0, None)


def test_the_generated_files_are_up_to_date():
    """configs/_base.yaml and docs/configuration.md say what the schema says (python -m lilt_ds.schema)."""
    for path, text in schema.generated_files(ROOT).items():
        assert os.path.isfile(path), f"{path} is missing: run python -m lilt_ds.schema"
        assert open(path).read() == text, f"{path} is out of date: run python -m lilt_ds.schema"


def test_the_generated_base_yaml_loads_as_the_defaults():
    import yaml

    base = yaml.safe_load(open(os.path.join(ROOT, "lilt_ds", "configs", "_base.yaml")))
    assert base == schema.defaults_dict()
    assert schema.parse(schema.ExperimentConfig, base) == schema.ExperimentConfig()


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.type=clipp", r"unknown loss type 'clipp'; allowed types: chunked, clip, fused, siglip \(loss\.type\)"),
        ("train.lr=fast", r"train\.lr = 'fast': expected a number > 0"),
        ("train.micro_batch_size=0", r"train\.micro_batch_size = 0: expected an integer >= 1"),
        (
            "loss.chunk_size=1024",
            r"loss\.chunk_size=1024 is an option of loss\.type chunked or fused or siglip, not clip",
        ),
        ("train.min_lr=1", r"train\.min_lr = 1\.0 is above train\.lr"),
        ("model.vision.unlock=[ln,layernorm]", r"unknown unlock item 'layernorm' in model\.vision\.unlock"),
        ("model.text.unlock=[top_k]", r"top_k needs a block count"),
        ("model.vision.pretrained=/no/such/weights.pth", r"vision weights file /no/such/weights\.pth does not exist"),
        ("data.train_files=[/no/such/train.json]", r"data\.train_files\[0\] = '/no/such/train\.json' does not exist"),
        ("loss.gather_with_grad=false", r"loss\.local_loss=true with loss\.gather_with_grad=false"),
    ],
)
def test_mistakes_are_refused_when_the_config_is_loaded(override, message):

    with pytest.raises(LiltError, match=message):
        load_config("lilt", [override])


def test_the_data_section_is_resolved_once_and_passed_on():
    from lilt_ds.data import resolve_data_config

    cfg = load_config("lilt", ["data.train_files=[]"])
    assert resolve_data_config(cfg.data) == cfg.data  # resolving it again changes nothing


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.scale=[0.9,0.2]", r"data\.augment\.scale = \[0\.9, 0\.2\]"),
        ("data.augment.preset=heavy", r"data\.augment\.preset = 'heavy': expected one of lilt, openclip, none"),
    ],
)
def test_augmentation_mistakes_are_refused_at_load_time(override, message):
    with pytest.raises(LiltError, match=message):
        load_config("lilt", [override])


def test_the_resolved_augmentation_is_saved_with_the_config():
    cfg = load_config("lilt", ["data.augment.preset=openclip", "data.augment.hflip=true"])
    assert dataclasses.asdict(cfg.data.augment) == {
        "preset": "openclip",
        "scale": [0.9, 1.0],
        "ratio": [0.75, 4 / 3],
        "interpolation": "bicubic",
        "hflip": True,
        "randaugment": False,
        "color_jitter": [0.0, 0.0, 0.0, 0.0],
        "grayscale": 0.0,
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.classification.data=/no/such/folder", r"eval\.classification\.data = '/no/such/folder' does not exist"),
        ("eval.classification.templates=a photo", r"prompt template\(s\) \['a photo'\] need a '\{\}'"),
    ],
)
def test_zero_shot_classification_mistakes_are_refused_at_load_time(override, message, tmp_path):
    (tmp_path / "cat").mkdir()
    extra = [] if "data=" in override else [f"eval.classification.data={tmp_path}"]
    with pytest.raises(LiltError, match=message):
        load_config("lilt", [override, *extra])


def test_tensorboard_without_its_package_is_refused_at_load(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"logging.tensorboard = true, but the tensorboard package is not installed"):
        load_config("demo", ["logging.tensorboard=true"])
    assert load_config("demo", ["logging.tensorboard=false"]).logging.tensorboard is False
