"""Parameter groups and schedules (lilt_ds/optim.py): per-tower learning rates, layer decay,
weight-decay exclusions, constant and constant-with-cooldown schedules, read back from DeepSpeed."""

import math
import os

import pytest

from lilt_ds.config import load_config
from lilt_ds.engine import load_ds_config, resolve_ds_config
from lilt_ds.errors import ConfigError, LiltError
from lilt_ds.models import build_model
from lilt_ds.optim import param_groups, parameter_lr_factors

from .conftest import tiny_overrides
from .distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = [
    "train.lr_scale.vision=0.5",
    "train.lr_scale.text=2.0",
    "train.lr_scale.heads=3.0",
    "model.vision.layer_decay=0.8",
]


def test_each_parameter_gets_its_towers_scale_times_its_layers_decay():
    model = build_model(load_config("clip", tiny_overrides("clip")))
    factors = parameter_lr_factors(model, {"vision": 0.5, "text": 2.0, "heads": 3.0}, {"vision": 0.8})
    depth = 12  # DeiT-tiny's blocks
    assert factors["vision.trunk.patch_embed.proj.weight"] == pytest.approx(0.5 * 0.8 ** (depth + 1))
    assert factors["vision.trunk.pos_embed"] == pytest.approx(0.5 * 0.8 ** (depth + 1))
    assert factors["vision.trunk.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 * 0.8**depth)
    assert factors["vision.trunk.blocks.11.mlp.fc2.bias"] == pytest.approx(0.5 * 0.8)
    assert factors["vision.trunk.norm.weight"] == pytest.approx(0.5)
    assert {factors[n] for n in factors if n.startswith("text.")} == {2.0}
    assert factors["vision_proj.weight"] == factors["text_proj.bias"] == factors["logit_scale"] == 3.0


def test_text_layer_decay_counts_bert_embeddings_as_layer_zero():
    model = build_model(load_config("clip", tiny_overrides("clip")))
    factors = parameter_lr_factors(model, {}, {"text": 0.5})
    assert factors["text.trunk.embeddings.word_embeddings.weight"] == pytest.approx(0.5**3)  # 2 layers
    assert factors["text.trunk.encoder.layer.1.output.dense.weight"] == pytest.approx(0.5)


def test_no_weight_decay_patterns_and_lr_per_group():
    model = build_model(load_config("clip", tiny_overrides("clip")))
    groups = param_groups(model, 0.1, lr=1e-3, lr_scale={"vision": 0.5}, no_weight_decay=[r"pos_embed$", r"cls_token"])
    named = {id(p): n for n, p in model.named_parameters()}
    undecayed = {named[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {"vision.trunk.pos_embed", "vision.trunk.cls_token"} <= undecayed
    assert sorted((g.get("lr") or 0, g["weight_decay"]) for g in groups) == [
        (0, 0.0),
        (0, 0.1),
        (5e-4, 0.0),
        (5e-4, 0.1),
    ]


def test_a_convolutional_tower_refuses_layer_decay():
    cfg = load_config("demo", ["model.vision.layer_decay=0.7", "model.vision.pretrained=false"])
    with pytest.raises(
        ConfigError,
        match=r"model\.vision\.layer_decay = 0\.7: the vision tower 'tf_efficientnet_lite0' "
        r"has no transformer blocks",
    ):
        param_groups(build_model(cfg), 0.0, lr=1.0, layer_decay={"vision": 0.7})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.schedule=linear", r"train\.schedule = 'linear': expected one of cosine, constant, constant_cooldown"),
        ("train.lr_scale.vision=0", r"train\.lr_scale\.vision = 0: expected a number > 0"),
        ("model.text.layer_decay=1.5", r"model\.text\.layer_decay = 1\.5: expected a number > 0 and <= 1"),
        ("train.no_weight_decay=['(']", r"train\.no_weight_decay = \['\('\]: expected a list of regular expressions"),
        ("train.cooldown_fraction=0", r"train\.cooldown_fraction = 0"),
    ],
)
def test_bad_settings_are_refused_at_load_time(override, message):
    with pytest.raises(LiltError, match=message):
        load_config("lilt", [override])


def test_constant_cooldown_refuses_a_ds_config_that_sets_its_own_schedule():
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds["scheduler"]["params"]["warmup_num_steps"] = 7
    with pytest.raises(
        ConfigError,
        match=r"train\.schedule=constant_cooldown: ds_config mine\.json has its own "
        r"scheduler block",
    ):
        resolve_ds_config(ds, load_config("lilt", ["train.schedule=constant_cooldown"]), 1, 10, "mine.json")


def _engine_rates(rank, world_size, schedule):
    """A real ZeRO-2 engine: each group's lr and names, then the lr of group 0 over the schedule."""
    from lilt_ds.engine import initialize
    from lilt_ds.runtime import init_distributed

    init_distributed()
    cfg = load_config(
        "clip",
        tiny_overrides(
            "clip",
            extra=SCALES
            + [
                f"train.schedule={schedule}",
                "train.lr=1e-3",
                "train.min_lr=1e-4",
                "train.warmup_steps=2",
                "train.cooldown_fraction=0.3",
                "train.micro_batch_size=2",
                r"train.no_weight_decay=[pos_embed$]",
            ],
        ),
    )
    ds = resolve_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json")), cfg, world_size, 10)
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    engine, optimizer, scheduler = initialize(model, ds, cfg, total_steps=10)
    groups = [
        {"lr": g["lr"], "weight_decay": g["weight_decay"], "names": [names[id(p)] for p in params]}
        for g, params in zip(optimizer.param_groups, optimizer.bit16_groups)
    ]
    base = list(scheduler.org_lrs)
    lrs = []
    for step in range(10):
        scheduler.step(step)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return {"groups": groups, "base": base, "lrs": lrs}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "constant_cooldown"])
def test_the_deepspeed_optimizer_holds_the_intended_rate_per_group(tmp_path, schedule):
    [result] = run_ranks(_engine_rates, 1, tmp_path, schedule)
    factors = parameter_lr_factors(
        build_model(load_config("clip", tiny_overrides("clip"))),
        {"vision": 0.5, "text": 2.0, "heads": 3.0},
        {"vision": 0.8},
    )
    for group, base in zip(result["groups"], result["base"]):
        assert [factors[n] for n in group["names"]] == pytest.approx([base / 1e-3] * len(group["names"]))
        assert ("vision.trunk.pos_embed" in group["names"]) <= (group["weight_decay"] == 0.0)
    model = build_model(load_config("clip", tiny_overrides("clip")))
    kinds = {
        (round(factors[n], 12), p.ndim > 1 and not n.endswith(".bias") and not n.endswith("pos_embed"))
        for n, p in model.named_parameters()
    }
    assert len(result["groups"]) == len(kinds) == 31  # embeddings, 12 blocks, the final norm (no matrix); text; heads
    ratios = [[lr / base for lr, base in zip(step, result["base"])] for step in result["lrs"]]
    assert all(max(r) - min(r) < 1e-9 for r in ratios)  # every group follows one schedule
    got = [r[0] for r in ratios]
    if schedule == "constant_cooldown":  # warmup 2 from 0.1, constant, the last 3 steps down to 0.1
        want = [0.1, 0.55, 1, 1, 1, 1, 1, 1 - 0.9 / 3, 1 - 1.8 / 3, 0.1]
    else:
        want = [0.1, 0.55] + [0.1 + 0.9 * (1 + math.cos(math.pi * (s - 1) / 8)) / 2 for s in range(2, 10)]
    assert got == pytest.approx(want)
