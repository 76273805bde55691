"""Zero-shot evaluation: retrieval recall@K both ways, and classification from prompt templates.

An image counts as retrieved by any of its captions, as in the original evaluation. Ties are
broken against the model: a positive ranks behind every negative with an equal score, so a
collapsed model (all scores equal) scores zero, not a perfect recall. Similarities are computed in
chunks, so 25k captions x 5k images never build the full matrix at once. Under several ranks
each encodes a shard (padded so all run the same forwards, as ZeRO-3 needs) and the embeddings are
gathered: the numbers are the same with any number of ranks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import torch

from .data.evaluation.datasets import CLASSIFICATION, DATASETS, RETRIEVAL
from .distributed import world_info
from .errors import ConfigError
from .schema import DataSettings

RECALL_KS = (1, 5, 10)


def _ranks_i2t(img: torch.Tensor, txt: torch.Tensor, img2txt: Sequence[Sequence[int]], chunk: int) -> torch.Tensor:
    """Per image: how many non-matching texts score at least as high as its best-scoring caption."""
    ranks = []
    for start in range(0, img.shape[0], chunk):
        scores = img[start : start + chunk] @ txt.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        for row, texts in enumerate(img2txt[start : start + chunk]):
            positive[row, list(texts)] = True
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best) & ~positive).sum(dim=1))
    return torch.cat(ranks)


def _ranks_t2i(img: torch.Tensor, txt: torch.Tensor, txt2img: Sequence[int], chunk: int) -> torch.Tensor:
    """Per text: how many other images score at least as high as its image."""
    ranks = []
    target = torch.as_tensor(list(txt2img), dtype=torch.long)
    for start in range(0, txt.shape[0], chunk):
        scores = txt[start : start + chunk] @ img.T
        rows = torch.arange(scores.shape[0])
        mine = target[start : start + chunk]
        own = scores[rows, mine].unsqueeze(1)
        higher = scores >= own
        higher[rows, mine] = False
        ranks.append(higher.sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = RECALL_KS,
    chunk: int = 1024,
) -> dict:
    """``{"txt_r1": .., "img_r1": .., ..., "txt_r_mean", "img_r_mean", "r_mean"}`` in percent.

    ``txt_rK`` is image->text recall (the original project's naming), ``img_rK`` text->image.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    i2t = _ranks_i2t(image_emb, text_emb, img2txt, chunk)
    t2i = _ranks_t2i(image_emb, text_emb, txt2img, chunk)
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (i2t < k).float().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (t2i < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ------------------------------------------------------------------------ encoding, sharded over ranks
def shard_indices(n: int) -> tuple[list[int], int]:
    """This rank's items (a strided share, padded by repeating item 0 so every rank runs the same
    number of forwards, which ZeRO-3 requires) and the padded share length."""
    rank, world = world_info()
    per_rank = -(-n // world)
    mine = [i for i in range(rank, per_rank * world, world)]
    return [i if i < n else 0 for i in mine], per_rank


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Undo ``shard_indices``: every rank's rows back in item order, padding dropped."""
    rank, world = world_info()
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, local.shape[-1])[:n]


@torch.no_grad()
def encode_images(
    model, dataset, batch_size: int, device, dtype=torch.float32, num_workers: int = 0, pin_memory: bool = False
) -> torch.Tensor:
    """L2-normalised embeddings of every image of ``dataset`` (items ``{"image", ...}``), in order."""
    from torch.utils.data import DataLoader, Subset

    from .data import collate_images

    indices, _ = shard_indices(len(dataset))
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_images,
    )
    dim = model.vision_proj.out_features
    local = [model.encode_image(b["images"].to(device, dtype, non_blocking=pin_memory)).float() for b in loader]
    local = torch.cat(local) if local else torch.empty(0, dim, device=device)
    return gather_rows(local, len(dataset)).cpu()


@torch.no_grad()
def encode_texts(model, texts, tokenizer, max_length: int, batch_size: int, device) -> torch.Tensor:
    """L2-normalised embeddings of every text, in order."""
    from .data import tokenize_captions

    indices, _ = shard_indices(len(texts))
    local = []
    for start in range(0, len(indices), batch_size):
        tokens = tokenize_captions(tokenizer, [texts[i] for i in indices[start : start + batch_size]], max_length)
        local.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float())
    local = torch.cat(local) if local else torch.empty(0, model.text_proj.out_features, device=device)
    return gather_rows(local, len(texts)).cpu()


def evaluate_retrieval(
    model, data, batch_size: int, device, dtype=torch.float32, num_workers: int = 0, pin_memory: bool = False
) -> dict:
    """Recall@K of a ``lilt_ds.data.RetrievalData``; every rank encodes a shard and gets the numbers."""
    was_training = model.training
    model.eval()
    image_emb = encode_images(model, data.images, batch_size, device, dtype, num_workers, pin_memory)
    text_emb = encode_texts(model, data.texts, data.tokenizer, data.max_length, batch_size, device)
    model.train(was_training)
    return retrieval_metrics(image_emb, text_emb, data.img2txt, data.txt2img)


# ------------------------------------------------------------------------ zero-shot classification
def classifier_weights(model, classnames, templates, tokenizer, max_length: int, batch_size: int, device):
    """One text embedding per class: the mean over the templates, re-normalised (CLIP's ensemble)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, prompts, tokenizer, max_length, batch_size, device)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def classification_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels, classnames) -> dict:
    """Top-1 / top-5 accuracy, mean per-class recall (percent) and per-class top-1 accuracy."""
    labels = torch.as_tensor(list(labels))
    scores = image_emb.float() @ class_emb.float().T
    k = min(5, scores.shape[1])
    topk = scores.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    per_class = {
        name: 100.0 * hit1[labels == i].float().mean().item()
        for i, name in enumerate(classnames)
        if (labels == i).any()
    }
    return {
        "top1": 100.0 * hit1.float().mean().item(),
        "top5": 100.0 * hit5.float().mean().item(),
        # the mean over the classes present of their top-1 recall (CLIP_benchmark's, sklearn's balanced accuracy)
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "per_class_top1": per_class,
        "num_images": len(labels),
        "num_classes": len(classnames),
    }


def evaluate_classification(
    model,
    dataset,
    tokenizer,
    templates,
    batch_size: int,
    device,
    dtype=torch.float32,
    max_length: int = 30,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> dict:
    model.eval()
    class_emb = classifier_weights(model, dataset.classnames, templates, tokenizer, max_length, batch_size, device)
    image_emb = encode_images(model, dataset, batch_size, device, dtype, num_workers, pin_memory)
    return classification_metrics(image_emb, class_emb, dataset.labels, dataset.classnames)


def format_retrieval_table(metrics: dict, ks: Sequence[int] = RECALL_KS) -> str:
    """A Markdown table of recall@K in both directions."""
    head = "| direction | " + " | ".join(f"R@{k}" for k in ks) + " | mean |"
    rule = "|---|" + "---:|" * (len(ks) + 1)
    rows = [
        "| image->text | "
        + " | ".join(f"{metrics[f'txt_r{k}']:.2f}" for k in ks)
        + f" | {metrics['txt_r_mean']:.2f} |",
        "| text->image | "
        + " | ".join(f"{metrics[f'img_r{k}']:.2f}" for k in ks)
        + f" | {metrics['img_r_mean']:.2f} |",
    ]
    return "\n".join([head, rule, *rows])


def format_datasets_table(results: list[dict]) -> str:
    """One row per dataset: classification accuracies, or retrieval recall both ways."""
    lines = [
        "| dataset | images | top-1 | top-5 | mean per-class recall | image->text R@1 | R@5 | text->image R@1 | R@5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["metrics"]
        if r["task"] == CLASSIFICATION:
            cells = [m["top1"], m["top5"], m["mean_per_class_recall"], None, None, None, None]
        else:
            cells = [None, None, None, m["txt_r1"], m["txt_r5"], m["img_r1"], m["img_r5"]]
        text = " | ".join("" if c is None else f"{c:.2f}" for c in cells)
        lines.append(f"| {r['dataset']} | {m['num_images']} | {text} |")
    return "\n".join(lines)


def clip_benchmark_record(dataset: str, task: str, metrics: dict, model: str, pretrained: str) -> dict:
    """A result as CLIP_benchmark writes it (``clip_benchmark eval --output``): its task and metric names,
    recalls and accuracies as fractions."""
    if task == CLASSIFICATION:
        values = {
            "acc1": metrics["top1"] / 100,
            "acc5": metrics["top5"] / 100,
            "mean_per_class_recall": metrics["mean_per_class_recall"] / 100,
        }
    else:
        values = {}
        for k in RECALL_KS:
            values[f"image_retrieval_recall@{k}"] = metrics[f"img_r{k}"] / 100
            values[f"text_retrieval_recall@{k}"] = metrics[f"txt_r{k}"] / 100
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": values,
        "language": "en",
    }


def write_clip_benchmark(folder: str, record: dict, name: str | None = None) -> str:
    """``folder/clip_benchmark/<name>.json`` (the dataset's name by default); its path."""
    out = os.path.join(folder, "clip_benchmark")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name or record['dataset']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def model_name(cfg) -> str:
    """What names a model in a results file: its pair, else its two towers."""
    return cfg.model.init_from or f"{cfg.model.vision.name}+{cfg.model.text.name}"


# ------------------------------------------------------------------------ a whole evaluation
def run_evaluation(
    task: str,
    data: str,
    checkpoint: str | None = None,
    config: str | None = None,
    overrides=(),
    image_root: str | None = None,
    classnames_file: str | None = None,
    templates: str = "a photo of a {}.",
    batch_size: int = 128,
    workers="auto",
    output: str | None = None,
) -> dict:
    """One dataset (``launch/evaluate.py --task T --data D``): its metrics, also written to ``output``
    (JSON; default outputs/eval-<task>-<time>.json)."""
    if task not in ("retrieval", "classification"):
        raise ConfigError(f"task {task!r}: choose retrieval or classification")
    result = evaluate_datasets(
        [f"{task}={data}"], checkpoint, config, overrides, image_root, classnames_file, templates, batch_size, workers
    )[0]
    if world_info()[0] == 0:
        out = output or os.path.join("outputs", f"eval-{task}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"task": task, "checkpoint": checkpoint, "data": data, **result["metrics"]}, f, indent=2)
        print(f"wrote {out}", flush=True)
    return result["metrics"]


def evaluate_datasets(
    specs: Sequence[str],
    checkpoint: str | None = None,
    config: str | None = None,
    overrides=(),
    image_root: str | None = None,
    classnames_file: str | None = None,
    templates: str = "auto",
    batch_size: int = 128,
    workers="auto",
    output_dir: str | None = None,
) -> list[dict]:
    """What ``launch/evaluate.py`` runs: a checkpoint, an export or (no ``checkpoint``) the untrained base
    towers (or pretrained pair) of ``config``, on each ``NAME=PATH`` of ``specs`` (see
    lilt_ds.data.evaluation.datasets); every rank encodes a shard. Every dataset is checked before the
    model is built. Rank 0 prints one table and, with ``output_dir``, writes ``results.jsonl`` (a line per
    dataset) and CLIP_benchmark's files (``clip_benchmark/<dataset>.json``). Returns
    ``[{"dataset", "task", "metrics"}, ...]``; ``config`` given with ``checkpoint`` must match it."""
    from .checkpoint import check_identity, run_identity
    from .config import load_config
    from .data import build_retrieval_data, build_zeroshot_data, eval_loader_settings, eval_preprocess_of
    from .data.evaluation.classification import check_classification_source, read_classnames
    from .data.evaluation.datasets import parse_dataset_spec
    from .export import load_trained
    from .models import build_model, build_tokenizer
    from .runtime import init_distributed, process_group_scope

    expected = load_config(config, overrides) if config else None
    sets = [parse_dataset_spec(spec) for spec in specs]
    labels = [label for label, _, _ in sets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--datasets names {labels}: each once (NAME:LABEL=PATH tells two sets of a kind apart)")
    names = read_classnames(classnames_file)
    for label, kind, path in sets:
        if not os.path.exists(path):
            raise ConfigError(f"--datasets {label}={path}: {path} does not exist")
        if kind.task == CLASSIFICATION:
            check_classification_source(path, names or _default_classnames(kind), f"--datasets {label}")
    results = []
    with process_group_scope():
        rank, _, device = init_distributed()  # the device (cuda:LOCAL_RANK) is bound before any collective
        if checkpoint:
            model, cfg = load_trained(checkpoint)
            if expected is not None:
                check_identity(run_identity(cfg), run_identity(expected), f"checkpoint {checkpoint}")
        else:
            cfg = expected or load_config("demo")
            model = build_model(cfg).eval()
        model.to(device)
        tokenizer = build_tokenizer(cfg.model)
        loader_workers, pin = eval_loader_settings(DataSettings(), device.type)  # the "auto" defaults
        if workers != "auto":
            loader_workers = workers
        size, mean, std = model.vision.image_size, model.vision.mean, model.vision.std
        preprocess = eval_preprocess_of(model.vision, cfg.eval.preprocess)
        for label, kind, path in sets:
            if kind.task == RETRIEVAL:
                root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
                data = build_retrieval_data(
                    path,
                    root,
                    tokenizer,
                    size,
                    mean,
                    std,
                    max_length=cfg.data.eval_max_length,
                    clean_captions=cfg.data.clean_captions,
                    max_words=cfg.data.max_words,
                    preprocess=preprocess,
                )
                metrics = evaluate_retrieval(
                    model, data, batch_size, device, num_workers=loader_workers, pin_memory=pin
                )
                metrics["num_images"] = len(data.images)
            else:
                dataset, prompts = build_zeroshot_data(
                    path,
                    size,
                    mean,
                    std,
                    image_root,
                    classnames_file or _default_classnames(kind),
                    kind.templates if templates == "auto" else templates,
                    preprocess,
                    f"--datasets {label}",
                )
                metrics = evaluate_classification(
                    model,
                    dataset,
                    tokenizer,
                    prompts,
                    batch_size,
                    device,
                    max_length=cfg.data.eval_max_length,
                    num_workers=loader_workers,
                    pin_memory=pin,
                )
            results.append({"dataset": label, "task": kind.task, "path": path, "metrics": metrics})
    if rank == 0:
        print(f"zero-shot evaluation of {checkpoint or model_name(cfg)}:\n{format_datasets_table(results)}", flush=True)
        if output_dir is not None:
            _write_results(output_dir, results, sets, cfg, checkpoint)
    return results


def _default_classnames(kind) -> str | None:
    return "imagenet" if kind.layout == "imagenet" else None


def _write_results(output_dir: str, results: list[dict], sets, cfg, checkpoint) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps({"time": time.time(), "checkpoint": checkpoint, **r}) + "\n")
    for r, (label, kind, _) in zip(results, sets):
        name = kind.benchmark_name if label in DATASETS else label  # a set without a label: the field's name
        record = clip_benchmark_record(name, r["task"], r["metrics"], model_name(cfg), checkpoint or "")
        write_clip_benchmark(output_dir, record, label)
    print(f"wrote {output_dir}/results.jsonl and {output_dir}/clip_benchmark/", flush=True)
