"""model.init_from: a pretrained OpenCLIP or Hugging Face pair, every mode and unlock on it, and its
export back to OpenCLIP / transformers folders (tiny pairs written by the libraries, no hub)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lilt_ds.errors import ConfigError
from tests.models.pairs import write_hf_folder, write_open_clip_folder

open_clip = pytest.importorskip("open_clip")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAIRS = ["open_clip:clip", "open_clip:siglip", "hf:clip", "hf:siglip"]
CAPTIONS = ["a dog runs on the grass", "two cats", "a red car parked by a wall"]


@pytest.fixture(scope="session")
def pair_folders(tmp_path_factory, minilm_tokenizer):
    root = tmp_path_factory.mktemp("pairs")
    folders = {}
    for kind in ("clip", "siglip"):
        folders[f"open_clip:{kind}"] = write_open_clip_folder(str(root / f"open_clip_{kind}"), kind)
        folders[f"hf:{kind}"] = write_hf_folder(str(root / f"hf_{kind}"), minilm_tokenizer, kind)
    return folders


def pair_overrides(pair, folder, mode="lilt", vision=(), text=(), extra=()):
    prefix, kind = pair.split(":")
    spec = f"open_clip:local-dir:{folder}" if prefix == "open_clip" else f"hf:{folder}"
    fmt = lambda items: "[" + ",".join(items) + "]"
    return [
        f"model.init_from={spec}",
        f"mode={mode}",
        f"model.vision.unlock={fmt(vision)}",
        f"model.text.unlock={fmt(text)}",
        *(["loss.type=siglip"] if kind == "siglip" else []),
        *extra,
    ]


def build(pair, folder, **kwargs):
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model, build_tokenizer

    cfg = load_config("lilt", pair_overrides(pair, folder, **kwargs))
    return cfg, build_model(cfg), build_tokenizer(cfg.model)


def source_features(pair, folder, images, batch):
    """The source library's own normalised features and (scale, bias), from the folder alone."""
    if pair.startswith("open_clip"):
        model = open_clip.create_model("local-dir:" + folder).eval()
        with torch.no_grad():
            return (
                model.encode_image(images, normalize=True),
                model.encode_text(batch["input_ids"], normalize=True),
                model.logit_scale.item(),
                None if model.logit_bias is None else model.logit_bias.item(),
            )
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images).pooler_output
        text = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    bias = getattr(model, "logit_bias", None)
    return (
        F.normalize(image, dim=-1),
        F.normalize(text, dim=-1),
        model.logit_scale.item(),
        None if bias is None else bias.item(),
    )


def inputs(model, tokenizer, seed=0):
    torch.manual_seed(seed)
    size = model.vision.image_size
    images = torch.randn(3, 3, size, size)
    batch = tokenizer(CAPTIONS, padding="longest", truncation=True, max_length=25, return_tensors="pt")
    return images, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("pair", PAIRS)
def test_a_pair_starts_with_the_source_features_scale_and_bias(pair, pair_folders):
    cfg, model, tokenizer = build(pair, pair_folders[pair], vision=["ln"], text=["ln"])
    model.eval()
    images, batch = inputs(model, tokenizer)
    with torch.no_grad():
        ours = (model.encode_image(images), model.encode_text(batch["input_ids"], batch["attention_mask"]))
    image, text, scale, bias = source_features(pair, pair_folders[pair], images, batch)
    assert (ours[0] - image).abs().max() <= 1e-6 and (ours[1] - text).abs().max() <= 1e-6
    assert model.logit_scale.item() == pytest.approx(scale, abs=1e-7) and scale == pytest.approx(2.5)
    assert (model.logit_bias is None) == (bias is None)
    if bias is not None:
        assert model.logit_bias.item() == pytest.approx(bias, abs=1e-7)
    assert cfg.model.image_size == model.vision.image_size  # the pair's own size, recorded in the config


def trainable(model, tower):
    return {n for n, p in getattr(model, tower).trunk.named_parameters() if p.requires_grad}


def every(model, tower):
    return {n for n, _ in getattr(model, tower).trunk.named_parameters()}


# what each unlock item must unlock, as a pattern over trunk parameter names, per pair family
EXPECTED = {
    "open_clip": {
        "ln": r"(.*\.)?(ln_\w+|ln_pre|ln_post|ln_final|norm\w*)\.(weight|bias)",
        "bitfit": r".*bias(\.original)?",
        "attn": r".*resblocks\.\d+\.attn\..*",
        "mlp": r".*resblocks\.\d+\.mlp\.(c_fc|c_proj)\..*",
        "top_k:1": r".*resblocks\.1\..*",
        "adapters": r".*\.adapter\..*",
        "lora": r".*lora_.*",
    },
    "hf": {
        "ln": r".*(layer_norm\d|layernorm|_layer_norm|post_layernorm|pre_layrnorm|norm)\.(weight|bias)",
        "bitfit": r".*bias",
        "attn": r"encoder\.layers\.\d+\.self_attn\..*",
        "mlp": r"encoder\.layers\.\d+\.mlp\..*",
        "top_k:1": r"encoder\.layers\.1\..*",
        "adapters": r".*\.adapter\..*",
        "lora": r".*lora_.*",
    },
}


@pytest.mark.parametrize("pair", ["open_clip:clip", "hf:clip"])
def test_every_mode_and_unlock_trains_exactly_what_it_names(pair, pair_folders):
    folder = pair_folders[pair]
    _, clip, _ = build(pair, folder, mode="clip")
    assert all(p.requires_grad for p in clip.parameters())
    _, lit, _ = build(pair, folder, mode="lit")
    assert not trainable(lit, "vision") and trainable(lit, "text") == every(lit, "text")
    _, bare, _ = build(pair, folder, mode="lilt")
    assert not trainable(bare, "vision") and not trainable(bare, "text")
    assert all(
        p.requires_grad for p in (*bare.vision_proj.parameters(), *bare.text_proj.parameters(), bare.logit_scale)
    )
    family = pair.split(":")[0]
    for item, pattern in EXPECTED[family].items():
        _, model, _ = build(pair, folder, vision=[item], text=[item])
        for tower in ("vision", "text"):
            names = trainable(model, tower)
            want = {n for n in every(model, tower) if re.fullmatch(pattern, n)}
            if item == "bitfit":  # every bias, wherever it lives (LoRA's parametrized weights have none)
                want = {n for n in every(model, tower) if n.endswith("bias")}
            assert names and names == want, (pair, item, tower, sorted(names ^ want)[:6])


def test_lora_on_packed_attention_trains_merges_and_is_refused_where_peft_cannot(pair_folders):
    from lilt_ds.export_formats import merge_lora

    folder = pair_folders["open_clip:clip"]
    _, model, tokenizer = build("open_clip:clip", folder, vision=["lora"], text=["lora"])
    names = trainable(model, "vision")
    assert any("attn.parametrizations.in_proj_weight" in n for n in names)  # the packed in-projection
    assert any("attn.out_proj.parametrizations.weight" in n for n in names)  # the out-projection MHA reads
    assert any("mlp.c_fc.lora_A" in n for n in names)  # the MLP through peft
    images, batch = inputs(model, tokenizer)
    model.eval()
    emb = model.encode_image(images)
    emb.sum().backward()
    lora_b = [p for n, p in model.vision.trunk.named_parameters() if n.endswith("in_proj_weight.0.lora_B")]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():  # trained LoRA (B no longer zero), then merged: the same function
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        before = (model.encode_image(images), model.encode_text(batch["input_ids"], batch["attention_mask"]))
        merge_lora(model)
        after = (model.encode_image(images), model.encode_text(batch["input_ids"], batch["attention_mask"]))
    assert not any("lora" in n or "parametrizations" in n for n, _ in model.named_parameters())
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) <= 1e-6

    with pytest.raises(ConfigError, match=r"nn\.MultiheadAttention.*target_modules=null"):
        build(
            "open_clip:clip",
            folder,
            vision=["lora"],
            extra=[r"model.vision.lora.target_modules=transformer\.resblocks\.\d+\.attn\.out_proj"],
        )
    with pytest.raises(ConfigError, match="lora.dropout"):
        build("open_clip:clip", folder, vision=["lora"], extra=["model.vision.lora.dropout=0.1"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.vision.name=small"], "model.vision.name='small' with model.init_from"),
        (["model.image_size=64"], "model.image_size=64 with model.init_from.*set model.image_size=null"),
        (["model.text.tokenizer=bert-base-uncased"], "the pair's own tokenizer"),
        (["memory.frozen_recompute=true"], "memory.frozen_recompute"),
        (["model.init_weights=laion2b_s34b_b79k"], "brings its own weights"),
    ],
)
def test_a_pair_refuses_keys_it_would_ignore(pair_folders, overrides, message):
    from lilt_ds.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("lilt", pair_overrides("open_clip:clip", pair_folders["open_clip:clip"], extra=overrides))


def test_init_from_errors_name_the_key_and_the_fix(pair_folders, tmp_path):
    from lilt_ds.config import load_config

    cases = [
        (["model.init_from=timm:vit"], "model.init_from='timm:vit': expected open_clip:... | hf:..."),
        (["model.init_from=open_clip:ViT-B-3"], "OpenCLIP has no architecture 'ViT-B-3'.*ViT-B-32"),
        (
            ["model.init_from=open_clip:ViT-B-32", "model.init_weights=no_such_tag"],
            "neither a file nor a pretrained tag",
        ),
        ([f"model.init_from=open_clip:local-dir:{tmp_path}/none"], "does not exist"),
        ([f"model.init_from=hf:{tmp_path}/none"], "does not exist"),
        (["model.init_weights=openai"], "without model.init_from"),
        ([f"model.init_from=hf:{pair_folders['hf:siglip']}"], "SigLIP.*set loss.type=siglip"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config("lilt", overrides)


@pytest.mark.slow
def test_summary_prints_what_a_pair_trains(pair_folders):
    spec = f"model.init_from=open_clip:local-dir:{pair_folders['open_clip:clip']}"
    out = subprocess.run(
        [
            sys.executable,
            "launch/summary.py",
            "--config",
            "lilt",
            "--overrides",
            spec,
            "model.vision.unlock=[ln]",
            "model.text.unlock=[lora]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model, trainable_summary

    counts = trainable_summary(
        build_model(load_config("lilt", [spec, "model.vision.unlock=[ln]", "model.text.unlock=[lora]"]))
    )
    for group in ("vision", "text", "heads", "total"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(group))
        assert f"{counts[group]['total']:,}" in row and f"{counts[group]['trainable']:,}" in row, row
    assert 0 < counts["vision"]["trainable"] < counts["vision"]["total"]


@pytest.mark.slow
def test_the_memory_estimator_counts_a_pair(pair_folders, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "launch/profile_memory.py",
            "--config",
            "lilt",
            "--overrides",
            f"model.init_from=open_clip:local-dir:{pair_folders['open_clip:clip']}",
            "model.vision.unlock=[ln,lora]",
            "model.text.unlock=[lora]",
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--world_size",
            "2",
            "--micro_batch",
            "4",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lilt (vision ln+lora, text lora)" in out.stdout and (tmp_path / "estimate.csv").exists()


# ------------------------------------------------------------------ training on 2 ranks, then export
RUNS = {  # name -> (pair, vision unlock, text unlock)
    "lilt_adapters": ("open_clip:clip", ["ln", "adapters"], ["ln", "adapters"]),
    "lora_open_clip": ("open_clip:clip", ["lora"], ["ln", "lora"]),
    "lora_hf": ("hf:clip", ["ln", "lora"], ["lora"]),
}


def _train_pairs(rank, world_size, tmp_dir, folders, ds_config):
    from lilt_ds.config import load_config
    from lilt_ds.train import Trainer

    def config(name, max_steps, output_dir):
        pair, vision, text = RUNS[name]
        return load_config(
            "lilt",
            pair_overrides(
                pair,
                folders[pair],
                vision=vision,
                text=text,
                extra=[
                    f"output_dir={output_dir}",
                    "data.num_workers=0",
                    "data.augment.randaugment=false",
                    "data.demo={n: 48, eval_n: 12, seed: 0, size: 32}",
                    "train.micro_batch_size=4",
                    f"train.max_steps={max_steps}",
                    "train.warmup_steps=1",
                    "train.lr=1e-2",
                    "train.log_every=1",
                    "eval.batch_size=8",
                ],
            ),
        )

    steps = {}
    for name in RUNS:
        trainer = Trainer(config(name, 3, f"{tmp_dir}/{name}"), ds_config, quiet=True)
        trainer.run()
        steps[name] = trainer.step
    # a pair's frozen-free checkpoint resumes: two more steps from the LoRA run's step 3
    trainer = Trainer(
        config("lora_hf", 5, f"{tmp_dir}/lora_hf_resumed"), ds_config, resume=f"{tmp_dir}/lora_hf", quiet=True
    )
    trainer.run()
    steps["resumed"] = trainer.step
    return steps


@pytest.fixture(scope="module")
def trained_pairs(tmp_path_factory, pair_folders):
    import json

    from tests.distributed import run_ranks

    tmp = tmp_path_factory.mktemp("pair_runs")
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["bf16"] = {"enabled": False}
    json.dump(ds, open(tmp / "zero2_fp32.json", "w"))
    steps = run_ranks(_train_pairs, 2, tmp, str(tmp), pair_folders, str(tmp / "zero2_fp32.json"))
    assert steps[0] == steps[1] == {**{name: 3 for name in RUNS}, "resumed": 5}
    return tmp


def _exported_features(fmt, folder, images, batch):
    if fmt == "open_clip":  # as a user without lilt_ds would: the folder alone
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
        model.eval()
        with torch.no_grad():
            return model.encode_image(images, normalize=True), model.encode_text(batch["input_ids"], normalize=True)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images).pooler_output
        text = model.get_text_features(**batch).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", [("lora_open_clip", "open_clip"), ("lora_hf", "hf")])
def test_a_lora_run_on_two_ranks_exports_to_its_ecosystem(trained_pairs, pair_folders, name, fmt):
    from lilt_ds.export import load_trained
    from lilt_ds.models import build_tokenizer

    run_dir, out = trained_pairs / name, trained_pairs / f"{name}_{fmt}"
    cli = subprocess.run(
        [sys.executable, "launch/export.py", "--checkpoint", str(run_dir), "--format", fmt, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    model, cfg = load_trained(str(run_dir))
    images, batch = inputs(model, build_tokenizer(cfg.model))
    with torch.no_grad():
        ours = model.encode_image(images), model.encode_text(batch["input_ids"], batch["attention_mask"])
    theirs = _exported_features(fmt, str(out), images, batch)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-5
    # training moved the weights: the export is not the untouched source
    source = source_features(RUNS[name][0], pair_folders[RUNS[name][0]], images, batch)
    assert (ours[0] - source[0]).abs().max() > 1e-4
    card = (out / "README.md").read_text()
    assert "mode `lilt`" in card and "lora" in card and "trainable parameters" in card and "txt_r1" in card
    if fmt == "hf":
        from PIL import Image
        from transformers import pipeline

        classify = pipeline("zero-shot-image-classification", model=str(out))
        scores = classify(Image.new("RGB", (40, 40), (200, 30, 30)), candidate_labels=["a dog", "a car"])
        assert {s["label"] for s in scores} == {"a dog", "a car"}


@pytest.mark.slow
def test_a_lilt_adapter_run_on_two_ranks_is_refused_by_name_and_exports_as_lilt_ds(trained_pairs):
    from lilt_ds.export import export_checkpoint, load_exported, load_trained
    from lilt_ds.export_formats import export_pretrained_format
    from lilt_ds.models import build_tokenizer

    run_dir = str(trained_pairs / "lilt_adapters")
    with pytest.raises(ConfigError, match=r"bottleneck adapters .*--format lilt_ds"):
        export_pretrained_format(run_dir, str(trained_pairs / "refused"), "open_clip")
    model, cfg = load_trained(run_dir)
    rebuilt = load_exported(export_checkpoint(run_dir, str(trained_pairs / "adapters.safetensors")))
    images, batch = inputs(model, build_tokenizer(cfg.model))
    with torch.no_grad():
        diffs = [
            (a - b).abs().max().item()
            for a, b in zip(
                model(images, batch["input_ids"], batch["attention_mask"]),
                rebuilt(images, batch["input_ids"], batch["attention_mask"]),
            )
        ]
    assert max(diffs) <= 1e-6


def test_launch_evaluate_scores_a_pair_run_as_training_did(trained_pairs, tmp_path):
    import json

    from lilt_ds.data.demo import generate_demo
    from lilt_ds.evaluate import run_evaluation

    demo = generate_demo(str(tmp_path / "demo"), n=48, eval_n=12, seed=0, size=32)  # the runs' eval split
    run_dir = trained_pairs / "lora_open_clip"
    metrics = run_evaluation(
        "retrieval",
        demo["eval"],
        checkpoint=str(run_dir),
        image_root=demo["image_root"],
        batch_size=8,
        workers=0,
        output=str(tmp_path / "r.json"),
    )
    during = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    keys = [k for k in metrics if k.startswith(("txt_r", "img_r"))]
    assert keys and all(metrics[k] == pytest.approx(during[k]) for k in keys), (metrics, during)


@pytest.mark.slow
def test_zero_shot_numbers_agree_with_clip_benchmark_on_an_exported_model(trained_pairs, tmp_path):
    """The LoRA run exported to OpenCLIP's format, evaluated by CLIP_benchmark's own command line and by
    lilt_ds on the same real photos (classification) and the same captioned set (retrieval), with the same
    class names and template: within 0.1 points (benchmarks/zeroshot_agreement.py, through its command)."""
    from lilt_ds.export_formats import export_pretrained_format

    exported = export_pretrained_format(str(trained_pairs / "lora_open_clip"), str(tmp_path / "oc"), "open_clip")
    result = subprocess.run(
        [sys.executable, "benchmarks/zeroshot_agreement.py", "--model", exported, "--out", str(tmp_path / "agree")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| photos (")]
    assert {r[1].strip() for r in rows} >= {"acc1", "mean_per_class_recall", "image_retrieval_recall@1"}
    assert all(abs(float(r[4])) <= 0.1 for r in rows) and len(rows) == 8, result.stdout[-3000:]
    written = json.loads((tmp_path / "agree" / "lilt_ds" / "clip_benchmark" / "photos.json").read_text())
    assert written["task"] == "zeroshot_classification" and set(written["metrics"]) == {
        "acc1",
        "acc5",
        "mean_per_class_recall",
    }
