"""How well each mode learns on real captioned images, under one recipe, over several seeds, against a
plain-PyTorch reference.

    python benchmarks/learning.py [--epochs 5 --size 128 --eval-n 150 --batch 32 --seeds 0 1 2]
        [--sources tuxpaint openclipart] [--only ROW ...] [--set KEY=VALUE ...] [--out outputs/learning]

Data: Tux Paint's captioned stamps and a cleaned, English-titled subset of Openclipart, both from
Debian packages (benchmarks/learning_data.py), one image per distinct caption, `--eval-n` of each held
out by a fixed split. Towers: the demo's real pretrained pair (EfficientNet-Lite0 and MiniLM-L6,
shipped in PyPI packages). Every run goes through `lilt_ds.train.train` (DeepSpeed ZeRO-2, fp32, one
process) with the same recipe: AdamW at `--lr`, linear warmup then cosine to lr/10, batch 32
(`--batch`), the evaluation transform for training too (`data.augment.preset=none`, except in the
augmentation rows). Further rows repeat modes with the training keys of the `lilt_small` preset (its
recipe on these towers) and LiT and CLIP with the towers at a tenth of the learning rate; `--set` adds
overrides to every run (how recipe candidates were measured). The plain reference trains only the two
projections and the temperature, in a 30-line loop of plain PyTorch (features of the same frozen towers
computed once, symmetric InfoNCE, torch AdamW, the same schedule); our projection-only run must match
it within the seeds' spread. Every row runs every seed; prints Markdown tables (mean and sample
standard deviation over seeds, then every run) and writes them, with every run's metrics, to --out.
"""

import argparse
import json
import math
import os
import time

from learning_data import SOURCES, ensure_learning_data  # a sibling: the script's folder is first on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (row, what trains, overrides): one recipe, only the mode and the unlock sets differ
RUNS = [
    (
        "projections only",
        "2 projections + temperature",
        ["mode=lilt", "model.vision.unlock=[]", "model.text.unlock=[]"],
    ),
    ("LiT", "text tower (image tower locked)", ["mode=lit", "model.vision.unlock=[]", "model.text.unlock=[]"]),
    ("LilT ln", "LayerNorm/BatchNorm affine", ["mode=lilt", "model.vision.unlock=[ln]", "model.text.unlock=[ln]"]),
    ("LilT bitfit", "biases", ["mode=lilt", "model.vision.unlock=[bitfit]", "model.text.unlock=[bitfit]"]),
    (
        "LilT ln + adapters",
        "norms; text adapters",
        ["mode=lilt", "model.vision.unlock=[ln]", "model.text.unlock=[ln,adapters]"],
    ),
    ("LilT LoRA", "image norms; text LoRA r=8", ["mode=lilt", "model.vision.unlock=[ln]", "model.text.unlock=[lora]"]),
    ("CLIP", "everything", ["mode=clip", "model.vision.unlock=[]", "model.text.unlock=[]"]),
]
REFERENCE = "plain reference"
AUGMENT_ROWS = [("projections only, augment lilt", "lilt"), ("projections only, augment openclip", "openclip")]
SMALL_DATA_PRESET = "lilt_small"  # its recipe keys, measured on these modes beside the plain recipe
SMALL_DATA_ROWS = ("LilT ln + adapters", "LilT LoRA")
SLOWER_TOWERS = ("towers at lr/10", ["train.lr_scale={vision: 0.1, text: 0.1}"], ("LiT", "CLIP"))
RECIPE_KEYS = ("lr_scale", "weight_decay", "no_weight_decay")  # of train: what the preset adds (and its augment)


def preset_recipe(name: str) -> list[str]:
    """The preset's training-recipe keys as overrides (its towers, data and schedule length are the benchmark's)."""
    from lilt_ds.config import load_config

    cfg = load_config(name)
    keys = [f"train.{key}={json.dumps(_plain(getattr(cfg.train, key)))}" for key in RECIPE_KEYS]
    return keys + [f"data.augment.preset={cfg.data.augment.preset}"]


def _plain(value):
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def recipe(args, data, seed: int, out: str) -> list:
    return [
        f"data.train_files=[{data['train']}]",
        f"data.eval_file={data['eval']}",
        f"data.eval_image_root={data['image_root']}",
        "data.augment.preset=none",
        "data.num_workers=1",
        f"model.image_size={args.size}",
        f"train.epochs={args.epochs}",
        f"train.micro_batch_size={args.batch}",
        f"train.lr={args.lr}",
        f"train.min_lr={args.lr / 10}",
        f"train.warmup_steps={args.warmup}",
        "train.log_every=1000",
        f"eval.every_epochs={args.epochs}",
        f"seed={seed}",
        f"output_dir={out}",
        "checkpoint.save_last_only=true",
    ]


def fp32_ds_config(folder: str) -> str:
    """ds_configs/zero2.json in fp32: the reference computes in fp32, and so must the run it is compared with."""
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": False}
    path = os.path.join(folder, "zero2_fp32.json")
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return path


def ours(args, data, ds_path: str, overrides: list, seed: int, out: str) -> tuple[dict, float]:
    from lilt_ds.config import load_config
    from lilt_ds.train import train

    cfg = load_config("demo", recipe(args, data, seed, out) + overrides)
    start = time.perf_counter()
    metrics = train(cfg, ds_path)
    return metrics, time.perf_counter() - start


def plain_reference(args, data, seed: int) -> tuple[dict, float]:
    """Projections and temperature on frozen features, in plain PyTorch."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms as T

    from lilt_ds.config import load_config
    from lilt_ds.data import pre_caption
    from lilt_ds.evaluate import retrieval_metrics
    from lilt_ds.models import build_model, build_tokenizer

    start = time.perf_counter()
    cfg = load_config("demo", recipe(args, data, seed, "unused") + RUNS[0][2])
    towers = build_model(cfg).eval()  # the same frozen towers; everything below is plain PyTorch
    tokenizer = build_tokenizer(cfg.model)
    transform = T.Compose(
        [
            T.Resize((args.size, args.size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(towers.vision.mean, towers.vision.std),
        ]
    )

    @torch.no_grad()
    def features(entries, root):
        images, texts = [], []
        for i in range(0, len(entries), 64):
            chunk = entries[i : i + 64]
            pixels = torch.stack([transform(Image.open(os.path.join(root, e["image"])).convert("RGB")) for e in chunk])
            images.append(towers.vision(pixels))
            captions = [
                pre_caption(e["caption"] if isinstance(e["caption"], str) else e["caption"][0], 30) for e in chunk
            ]
            tokens = tokenizer(captions, padding="longest", truncation=True, max_length=30, return_tensors="pt")
            texts.append(towers.text(tokens["input_ids"], tokens["attention_mask"]))
        return torch.cat(images), torch.cat(texts)

    with open(data["train"]) as f, open(data["eval"]) as g:
        train_entries, eval_entries = json.load(f), json.load(g)
    train_img, train_txt = features(train_entries, "/")
    eval_img, eval_txt = features(eval_entries, data["image_root"])

    torch.manual_seed(seed)
    vision_proj = torch.nn.Linear(train_img.shape[1], cfg.model.embed_dim)
    text_proj = torch.nn.Linear(train_txt.shape[1], cfg.model.embed_dim)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*vision_proj.parameters(), *text_proj.parameters(), logit_scale]
    decay = [vision_proj.weight, text_proj.weight]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in params if all(p is not d for d in decay)], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    steps_per_epoch = len(train_entries) // args.batch
    total, warmup, floor = args.epochs * steps_per_epoch, args.warmup, 0.1

    def ratio(step):  # DeepSpeed's WarmupCosineLR, linear warmup
        if step < warmup:
            return floor + (1 - floor) * step / warmup
        return (
            floor + (1 - floor) * (1 + math.cos(math.pi * min(1.0, (step - warmup + 1) / max(1, total - warmup)))) / 2
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)
    for _ in range(args.epochs):
        order = torch.randperm(len(train_entries))
        for b in range(steps_per_epoch):
            rows = order[b * args.batch : (b + 1) * args.batch]
            image = F.normalize(vision_proj(train_img[rows]), dim=-1)
            text = F.normalize(text_proj(train_txt[rows]), dim=-1)
            logits = logit_scale.exp() * image @ text.T
            labels = torch.arange(len(rows))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(100))
    with torch.no_grad():
        image = F.normalize(vision_proj(eval_img), dim=-1)
        text = F.normalize(text_proj(eval_txt), dim=-1)
    metrics = retrieval_metrics(image, text, [[i] for i in range(len(eval_entries))], list(range(len(eval_entries))))
    return metrics, time.perf_counter() - start


def row(name: str, trains: str, metrics: dict, seconds: float) -> str:
    cells = [f"{metrics[f'txt_r{k}']:.1f}" for k in (1, 5, 10)] + [f"{metrics[f'img_r{k}']:.1f}" for k in (1, 5, 10)]
    return f"| {name} | {trains} | " + " | ".join(cells) + f" | {seconds:.0f} s |"


def mean_spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation over seeds (0 for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summary_table(records: list[dict], names: list[tuple[str, str]]) -> str:
    """One line per run: mean ± sample std over seeds of R@1 and R@5 both ways, R@1 (the mean of both
    ways) against the plain reference's, and each direction's R@1 minus projections only's with the same
    seed (the same batches), mean ± std over seeds."""
    r1 = lambda r: (r["txt_r1"] + r["img_r1"]) / 2
    by_run = {name: [r for r in records if r["run"] == name] for name, _ in names}
    reference = [r1(r) for r in by_run.get(REFERENCE, [])]
    reference = mean_spread(reference)[0] if reference else None
    baseline = {r["seed"]: r for r in by_run.get(RUNS[0][0], [])}
    lines = [
        "| run | trains | seeds | i->t R@1 | t->i R@1 | i->t R@5 | t->i R@5 | R@1 mean | vs reference "
        "| i->t R@1 minus projections only | t->i R@1 minus projections only | time/run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, trains in names:
        runs = by_run[name]
        if not runs:
            continue
        cells = []
        for key in ("txt_r1", "img_r1", "txt_r5", "img_r5"):
            mean, spread = mean_spread([r[key] for r in runs])
            cells.append(f"{mean:.1f} ± {spread:.1f}")
        both, spread = mean_spread([r1(r) for r in runs])
        cells.append(f"{both:.1f} ± {spread:.1f}")
        cells.append(f"{both / reference:.2f}x" if reference else "-")
        for key in ("txt_r1", "img_r1"):
            paired = [r[key] - baseline[r["seed"]][key] for r in runs if r["seed"] in baseline]
            cells.append("{:+.1f} ± {:.1f}".format(*mean_spread(paired)) if paired and name != RUNS[0][0] else "-")
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        lines.append(f"| {name} | {trains} | {len(runs)} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--eval-n", "--eval_n", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES, help="captioned image sets")
    parser.add_argument("--out", default="outputs/learning")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all, the plain reference included)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to every lilt_ds run (a recipe)"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()
    data = ensure_learning_data(args.size, args.eval_n, tuple(args.sources))
    ds_path = fp32_ds_config(args.out)
    head = (
        "| run | trains | i->t R@1 | R@5 | R@10 | t->i R@1 | R@5 | R@10 | time |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    runs = RUNS + [(name, RUNS[0][1], RUNS[0][2] + [f"data.augment.preset={preset}"]) for name, preset in AUGMENT_ROWS]
    variants = [(f"{SMALL_DATA_PRESET} recipe", preset_recipe(SMALL_DATA_PRESET), SMALL_DATA_ROWS), SLOWER_TOWERS]
    runs += [(f"{name}, {what}", t, o + more) for what, more, rows in variants for name, t, o in RUNS if name in rows]
    runs = [run for run in runs if not args.only or run[0] in args.only]
    with_reference = not args.only or REFERENCE in args.only
    lines, records = [], []
    for seed in args.seeds:
        if with_reference:
            metrics, seconds = plain_reference(args, data, seed)
            lines.append(row(f"{REFERENCE}, seed {seed}", RUNS[0][1], metrics, seconds))
            records.append({"run": REFERENCE, "seed": seed, "seconds": seconds, **metrics})
        for name, trains, overrides in runs:
            folder = os.path.join(args.out, f"{name.replace(' ', '_').replace(',', '')}-{seed}")
            metrics, seconds = ours(args, data, ds_path, overrides + args.set, seed, folder)
            lines.append(row(f"{name}, seed {seed}", trains, metrics, seconds))
            records.append({"run": name, "seed": seed, "seconds": seconds, **metrics})
            print(lines[-1], flush=True)
    names = [(REFERENCE, RUNS[0][1])] * with_reference + [run[:2] for run in runs]
    summary = (
        f"{data['pairs']} training and {data['held_out']} held-out pairs ("
        + ", ".join(f"{name}: {n['pairs']} + {n['held_out']}" for name, n in data["sources"].items())
        + f"), {args.size} px, "
        f"{args.epochs} epochs of batch {args.batch}, lr {args.lr:g}"
        + (f", {' '.join(args.set)}" if args.set else "")
        + f", seeds {' '.join(map(str, args.seeds))}; whole benchmark {time.perf_counter() - began:.0f} s"
    )
    table = summary_table(records, names) + "\n\nEvery run:\n\n" + "\n".join([head, *lines])
    print("\n" + summary + "\n\n" + table, flush=True)
    with open(os.path.join(args.out, "learning.md"), "w") as f:
        f.write(summary + "\n\n" + table + "\n")
    with open(os.path.join(args.out, "learning.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
