"""The built-in demo dataset: synthetic scenes of coloured shapes with compositional captions.

Every colour, shape, size, count and spatial word of a caption is true of its image, so a dual
encoder can learn retrieval from it in minutes on a CPU. Spatial words are "above", "below" and
"next to" only, because the default train transform flips images horizontally (which would make
"left of" false half of the time), and the default RandAugment op set leaves hues alone.

    python launch/make_demo.py --out DIR [--n 5000 --eval_n 500 --seed 0 --size 128]

writes DIR/train.json (pretraining format, absolute paths, several captions per image),
DIR/eval.json (retrieval format, paths relative to DIR) and DIR/images/*.jpg. The same arguments
give the same JSON bytes.
"""

import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..fileio import cache_folder
from .errors import DataError

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.06, "large": 0.12}  # object radius, as a fraction of the image side
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
INVERSE_RELATION = {"above": "below", "below": "above", "next to": "next to"}
_GAP = 0.02  # minimum free space between objects and borders
_POOL_THRESHOLD = 400  # fewer images are drawn in this process


@dataclass(frozen=True)
class Group:
    """`count` objects of one size, colour and shape; `centres` in [0, 1] image coordinates."""

    count: int
    size: str
    colour: str
    shape: str
    centres: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scene:
    """One image: a background and one or two groups; with two, `relation` places the first
    relative to the second."""

    background: tuple[int, int, int]
    groups: tuple[Group, ...]
    relation: str | None
    tint: int  # colour jitter of this image's objects


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene whose objects do not overlap (retrying the layout until one fits)."""
    while True:
        kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2 if rng.random() < 0.6 else 1)
        relation = rng.choice(list(INVERSE_RELATION)) if len(kinds) == 2 else None
        regions = _regions(relation, rng)
        groups, placed = [], []
        for (colour, shape), region in zip(kinds, regions):
            count, size = rng.randint(1, 3), rng.choice(list(SIZES))
            centres = _place(count, SIZES[size], region, placed, rng)
            if centres is None:
                break
            groups.append(Group(count, size, colour, shape, centres))
        else:
            background = tuple(rng.randint(215, 255) for _ in range(3))
            return Scene(background, tuple(groups), relation, rng.randint(-20, 20))


def _regions(relation: str | None, rng: random.Random) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) areas of the first and second group."""
    top, bottom = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    if relation is None:
        return [(0.0, 0.0, 1.0, 1.0)]
    if relation == "above":
        return [top, bottom]
    if relation == "below":
        return [bottom, top]
    return [left, right] if rng.random() < 0.5 else [right, left]


def _place(count, radius, region, placed, rng, tries=200):
    x0, y0, x1, y1 = region
    lo_x, hi_x, lo_y, hi_y = x0 + radius + _GAP, x1 - radius - _GAP, y0 + radius + _GAP, y1 - radius - _GAP
    if lo_x > hi_x or lo_y > hi_y:
        return None
    centres = []
    for _ in range(tries):
        x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        if all(math.hypot(x - px, y - py) >= radius + pr + _GAP for px, py, pr in placed):
            placed.append((x, y, radius))
            centres.append((round(x, 4), round(y, 4)))
            if len(centres) == count:
                return tuple(centres)
    return None


def draw_scene(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for group in scene.groups:
        colour = tuple(min(255, max(0, c + scene.tint)) for c in COLOURS[group.colour])
        radius = SIZES[group.size] * size
        for x, y in group.centres:
            _draw_shape(draw, group.shape, x * size, y * size, radius, colour)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([x - h, y - h, x + h, y + h], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)], fill=colour)
    else:  # star
        points = [
            (
                x + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                y - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=colour)


def scene_captions(scene: Scene) -> list[str]:
    """Several phrasings of the same content (one is drawn per epoch in training)."""
    first = scene.groups[0]
    if scene.relation is None:
        return [
            _phrase(first),
            f"a picture of {_phrase(first, article=False)}",
            f"{_phrase(first, with_size=False)} on a plain background",
            f"there {'is' if first.count == 1 else 'are'} {_phrase(first)}",
        ]
    second = scene.groups[1]
    return [
        f"{_phrase(first)} {scene.relation} {_phrase(second)}",
        f"{_phrase(second)} {INVERSE_RELATION[scene.relation]} {_phrase(first)}",
        f"{_phrase(first, with_size=False)} and {_phrase(second, with_size=False)}",
        f"a picture of {_phrase(first, article=False)} and {_phrase(second, article=False)}",
    ]


def _phrase(group: Group, article: bool = True, with_size: bool = True) -> str:
    """ "two small red circles", "a large blue square", "an orange star", "one small red circle"."""
    words = ([group.size] if with_size else []) + [group.colour, group.shape + ("s" if group.count > 1 else "")]
    if group.count == 1 and article:
        count = "an" if words[0][0] in "aeiou" else "a"
    else:
        count = COUNT_WORDS[group.count]
    return " ".join([count] + words)


def _render(job: tuple[Scene, int, str]) -> None:
    scene, size, path = job
    draw_scene(scene, size).save(path, format="JPEG", quality=90)


def generate_demo(
    out: str, n: int = 5000, eval_n: int = 500, seed: int = 0, size: int = 128, final_dir: str | None = None
) -> dict[str, str]:
    """Write the demo dataset into `out`; `train.json` names images under `final_dir` (default
    `out`), for writing into a temporary folder that is renamed afterwards."""
    out = os.path.abspath(out)
    final_dir = os.path.abspath(final_dir or out)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    splits = {"train": n, "eval": eval_n}
    scenes = {
        split: [sample_scene(random.Random(f"lilt_ds-demo:{seed}:{split}:{i}")) for i in range(count)]
        for split, count in splits.items()
    }
    names = {split: [f"images/{split}_{i:06d}.jpg" for i in range(count)] for split, count in splits.items()}
    jobs = [
        (scene, size, os.path.join(out, name)) for split in splits for scene, name in zip(scenes[split], names[split])
    ]
    processes = min(os.cpu_count() or 1, 8)
    if len(jobs) >= _POOL_THRESHOLD and processes > 1:
        with multiprocessing.get_context().Pool(processes) as pool:
            pool.map(_render, jobs, chunksize=64)
    else:
        for job in jobs:
            _render(job)
    train = [
        {"image": os.path.join(final_dir, name), "image_id": i, "caption": scene_captions(scene)}
        for i, (scene, name) in enumerate(zip(scenes["train"], names["train"]))
    ]
    evaluation = [
        {"image": name, "caption": scene_captions(scene)} for scene, name in zip(scenes["eval"], names["eval"])
    ]
    for filename, entries in (("train.json", train), ("eval.json", evaluation)):
        with open(os.path.join(out, filename), "w", encoding="utf-8") as handle:
            json.dump(entries, handle, indent=1)
    return {
        "train": os.path.join(final_dir, "train.json"),
        "eval": os.path.join(final_dir, "eval.json"),
        "image_root": final_dir,
    }


def ensure_demo_data(
    cache_dir: str | None = None, n: int = 5000, seed: int = 0, eval_n: int = 500, size: int = 128
) -> dict[str, str]:
    """The demo dataset, generated on first use and reused afterwards:
    `{"train": train.json, "eval": eval.json, "image_root": folder}`.

    The folder is `cache_dir`, by default `$LILT_DS_CACHE` (else ~/.cache/lilt_ds) joined with
    `demo-<n>-<seed>-eval<eval_n>-<size>px`. It is written to a temporary folder beside it and
    renamed into place, so ranks calling this at the same time never see a half-written dataset
    (each may generate; the first rename wins)."""
    if cache_dir is None:
        cache_dir = os.path.join(cache_folder(), f"demo-{n}-{seed}-eval{eval_n}-{size}px")
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    paths = {
        "train": os.path.join(cache_dir, "train.json"),
        "eval": os.path.join(cache_dir, "eval.json"),
        "image_root": cache_dir,
    }
    if os.path.isdir(cache_dir):
        if not (os.path.isfile(paths["train"]) and os.path.isfile(paths["eval"])):
            raise DataError(
                f"{cache_dir} exists but holds no demo dataset (train.json, eval.json); "
                "delete it, or point LILT_DS_CACHE elsewhere."
            )
        return paths
    parent = os.path.dirname(cache_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_dir)}.tmp-", dir=parent)
    try:
        generate_demo(scratch, n=n, eval_n=eval_n, seed=seed, size=size, final_dir=cache_dir)
        os.rename(scratch, cache_dir)
    except OSError:
        if not os.path.isdir(cache_dir):  # the rename lost to another process only if it exists
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return paths
