"""lilt_ds's zero-shot numbers beside CLIP_benchmark's, on the same model and the same local sets: a
classification ImageFolder of real photos and a retrieval set (the same photos with captions, or Tux
Paint's held-out stamps with their human captions). The two agree within 0.1 points, or it exits 1.

    python benchmarks/zeroshot_agreement.py --model EXPORTED_OPENCLIP_FOLDER [--out DIR] [--tuxpaint 150]
    python benchmarks/zeroshot_agreement.py --model open_clip:ViT-B-32 --tuxpaint 150   # its architecture, random

The model is an OpenCLIP model folder (``launch/export.py --format open_clip``, or any ``local-dir:``
folder): CLIP_benchmark loads it as ``--model local-dir:FOLDER``, lilt_ds as
``model.init_from=open_clip:local-dir:FOLDER``. Both sides get the same class names and the same one
template ("a photo of a {}."), OpenCLIP's preprocessing and raw captions. CLIP_benchmark runs through its
own command line (the PyPI package ``clip-benchmark``) in fp32 (``--no_amp``), with one fix: version
1.6.2's ``accuracy`` calls ``float()`` on a one-element array, which NumPy 2 refuses; the same count is
taken with ``.item()``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from data_throughput import source_photos  # a sibling: the script's folder is first on sys.path
from PIL import Image

TEMPLATE = "a photo of a {}."
CROPS = 4  # views per photo in the classification set
# CLIP_benchmark's command line, with NumPy 2's refusal of float(one-element array) in its accuracy() fixed
CLIP_BENCHMARK = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zc
def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
zc.accuracy = accuracy
from clip_benchmark.cli import main
sys.exit(main())
"""


def photos() -> list[tuple[str, Image.Image]]:
    """(class name, RGB photo): data_throughput.py's real photos, a class per photo."""
    return [(name.lower().replace("_", " "), image) for name, image in source_photos([])]


def view(image: Image.Image, k: int, side: int = 256) -> Image.Image:
    """The k-th view of a photo: a crop of a different corner and size, resized to ``side`` on the short side."""
    w, h = image.size
    share = 1.0 - 0.1 * k
    cw, ch = int(w * share), int(h * share)
    left, top = (k % 2) * (w - cw), (k // 2 % 2) * (h - ch)
    crop = image.crop((left, top, left + cw, top + ch))
    scale = side / min(crop.size)
    return crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)


def write_classification(root: str, found) -> list[str]:
    """An ImageFolder at ``root/val`` (CLIP_benchmark's imagenet1k-unverified layout): a class per photo."""
    names = []
    for name, image in found:
        folder = os.path.join(root, "val", name)
        os.makedirs(folder, exist_ok=True)
        for k in range(CROPS):
            view(image, k).save(os.path.join(folder, f"{k}.jpg"), quality=95)
        names.append(name)
    return sorted(names)


def write_retrieval(root: str, entries: list[tuple[Image.Image, list[str]]]) -> str:
    """One set in both layouts: lilt_ds's JSON (the original format) and CLIP_benchmark's flickr30k
    (images in ``root``, ``flickr30k_test_karpathy.txt``). The JSON's path."""
    os.makedirs(root, exist_ok=True)
    records, lines = [], ["image,caption"]
    for i, (image, captions) in enumerate(entries):
        name = f"{i:05d}.jpg"
        image.save(os.path.join(root, name), quality=95)
        captions = [c.replace("\n", " ").strip() for c in captions]
        records.append({"image": name, "caption": captions})
        lines += [f"{name},{c}" for c in captions]
    with open(os.path.join(root, "flickr30k_test_karpathy.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    path = os.path.join(root, "test.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def photo_captions(found) -> list[tuple[Image.Image, list[str]]]:
    return [(view(image, 0), [f"a photo of a {name}", f"{name}, in a picture"]) for name, image in found]


def tuxpaint_captions(count: int) -> list[tuple[Image.Image, list[str]]]:
    """Tux Paint's held-out stamps with their captions (benchmarks/learning_data.py)."""
    from learning_data import ensure_learning_data  # a sibling

    data = ensure_learning_data(size=224, eval_n=count)
    with open(data["eval"]) as f:
        entries = json.load(f)
    return [(Image.open(os.path.join(data["image_root"], e["image"])).convert("RGB"), e["caption"]) for e in entries]


def run_clip_benchmark(model: str, out: str, *args: str) -> dict:
    command = [sys.executable, "-c", CLIP_BENCHMARK, "eval", "--model", f"local-dir:{model}", "--pretrained", ""]
    command += [*args, "--no_amp", "--num_workers", "0", "--batch_size", "32", "--output", out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"clip_benchmark failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)["metrics"]


def compare(model: str, out: str, tuxpaint: int = 0) -> list[tuple[str, str, float, float]]:
    """(dataset, metric, lilt_ds, CLIP_benchmark) in points, for the classification and retrieval sets."""
    from lilt_ds.evaluate import evaluate_datasets

    found = photos()
    names = write_classification(os.path.join(out, "photos"), found)
    retrieval = tuxpaint_captions(tuxpaint) if tuxpaint else photo_captions(found)
    retrieval_json = write_retrieval(os.path.join(out, "retrieval"), retrieval)
    with open(os.path.join(out, "classnames.json"), "w") as f:
        json.dump({"imagenet1k-unverified": names}, f)
    with open(os.path.join(out, "templates.json"), "w") as f:
        json.dump({"imagenet1k-unverified": [TEMPLATE.replace("{}", "{c}")]}, f)
    with open(os.path.join(out, "classnames.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    ours = evaluate_datasets(
        [f"classification:photos={out}/photos/val", f"flickr30k={retrieval_json}"],
        config="lilt",
        overrides=[f"model.init_from=open_clip:local-dir:{model}", "model.vision.unlock=[]", "model.text.unlock=[]"],
        classnames_file=os.path.join(out, "classnames.txt"),
        templates=TEMPLATE,
        batch_size=32,
        workers=0,
        output_dir=os.path.join(out, "lilt_ds"),
    )
    theirs_cls = run_clip_benchmark(
        model,
        os.path.join(out, "clip_benchmark_photos.json"),
        *("--dataset", "imagenet1k-unverified", "--dataset_root", f"{out}/photos"),
        *("--task", "zeroshot_classification", "--custom_classname_file", f"{out}/classnames.json"),
        *("--custom_template_file", f"{out}/templates.json"),
    )
    theirs_ret = run_clip_benchmark(
        model,
        os.path.join(out, "clip_benchmark_retrieval.json"),
        *("--dataset", "flickr30k", "--dataset_root", f"{out}/retrieval", "--task", "zeroshot_retrieval"),
        *("--recall_k", "1", "5", "10"),
    )
    cls, ret = ours[0]["metrics"], ours[1]["metrics"]
    rows = [
        ("photos (classification)", "acc1", cls["top1"], 100 * theirs_cls["acc1"]),
        (
            "photos (classification)",
            "mean_per_class_recall",
            cls["mean_per_class_recall"],
            100 * theirs_cls["mean_per_class_recall"],
        ),
    ]
    label = f"{'Tux Paint' if tuxpaint else 'photos'} (retrieval)"
    for k in (1, 5, 10):
        rows.append(
            (label, f"image_retrieval_recall@{k}", ret[f"img_r{k}"], 100 * theirs_ret[f"image_retrieval_recall@{k}"])
        )
        rows.append(
            (label, f"text_retrieval_recall@{k}", ret[f"txt_r{k}"], 100 * theirs_ret[f"text_retrieval_recall@{k}"])
        )
    return rows


def model_folder(spec: str, out: str) -> str:
    """An OpenCLIP model folder: ``spec`` itself, or for ``open_clip:ARCH`` that built-in architecture with
    random weights (seed 0) written as one (no weights download: the numbers are at chance, the agreement
    is what they show)."""
    if not spec.startswith("open_clip:"):
        if not os.path.isfile(os.path.join(spec, "open_clip_config.json")):
            raise SystemExit(f"--model {spec}: not an OpenCLIP model folder (no open_clip_config.json)")
        return os.path.abspath(spec)
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = spec[len("open_clip:") :]
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    folder = os.path.join(out, "model")
    os.makedirs(folder)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": model.visual.preprocess_cfg}, f)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "open_clip_model.safetensors")
    )
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="an OpenCLIP model folder (open_clip_config.json + weights), or open_clip:ARCH (random weights)",
    )
    parser.add_argument(
        "--out", default=None, help="where the sets and both sides' results go (default: a temp folder)"
    )
    parser.add_argument("--tuxpaint", type=int, default=0, help="retrieval on N held-out Tux Paint stamps (0: photos)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lilt_ds-agreement-")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    rows = compare(model_folder(args.model, out), out, args.tuxpaint)
    print(f"\nZero-shot numbers of {args.model}, in points:\n")
    print("| dataset | metric | lilt_ds | CLIP_benchmark | difference |")
    print("|---|---|---:|---:|---:|")
    for dataset, metric, ours, theirs in rows:
        print(f"| {dataset} | {metric} | {ours:.2f} | {theirs:.2f} | {ours - theirs:+.2f} |")
    worst = max(abs(ours - theirs) for _, _, ours, theirs in rows)
    print(f"\nlargest difference {worst:.2f} points ({'within' if worst <= 0.1 else 'OVER'} 0.1)")
    return 0 if worst <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
