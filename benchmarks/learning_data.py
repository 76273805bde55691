"""A real captioned image set from a Debian package, for the learning benchmark: Tux Paint's stamps.

`tuxpaint-stamps-default` (Debian main, GPL-2) ships about 800 PNG stamps, each with a `.txt`
whose first line is an English sentence written by a person ("A sea lion.", "Holly leaves are
shiny and have prickles!"): photographs of animals, food and plants cut out on a transparent
background, and drawings of vehicles, buildings and symbols. No PyPI, Debian or npm package we
found ships a larger set of real images with human captions (COCO and Flickr subsets live on
model hubs only).

The stamps are read from an installed package (/usr/share/tuxpaint/stamps), from
`$TUXPAINT_STAMPS`, or from the .deb fetched once with `apt-get download` into the cache; then each
captioned PNG is put on white, padded to a square, resized, and written with the original
project's JSON files (train.json: pretraining format; eval.json: retrieval format) into
`$LILT_DS_CACHE/tuxpaint-<size>px-eval<n>` (else ~/.cache/lilt_ds), as the demo data is cached.
One image per distinct caption; the held-out split is fixed by a hash of each stamp's path.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

from PIL import Image

from lilt_ds.fileio import cache_folder

PACKAGE = "tuxpaint-stamps-default"
INSTALLED = "/usr/share/tuxpaint/stamps"
VARIANTS = ("_mirror", "_back", "_thumb", "_flip")  # other views of a stamp that has its own entry


def stamps_folder() -> str:
    """Where the stamps are: $TUXPAINT_STAMPS, the installed package, or the .deb extracted into the cache."""
    given = os.environ.get("TUXPAINT_STAMPS")
    if given:
        if not os.path.isdir(given):
            raise SystemExit(f"error: TUXPAINT_STAMPS={given} is not a folder")
        return given
    if os.path.isdir(INSTALLED):
        return INSTALLED
    target = os.path.join(cache_folder(), PACKAGE)
    stamps = os.path.join(target, "usr", "share", "tuxpaint", "stamps")
    if os.path.isdir(stamps):
        return stamps
    os.makedirs(cache_folder(), exist_ok=True)  # the scratch folder beside the target: one rename, one filesystem
    scratch = tempfile.mkdtemp(prefix=f".{PACKAGE}.tmp-", dir=cache_folder())
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=scratch, check=True, capture_output=True, text=True)
        [deb] = glob.glob(os.path.join(scratch, "*.deb"))
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(scratch, "root")], check=True)
        os.rename(os.path.join(scratch, "root"), target)
    except (OSError, subprocess.CalledProcessError, ValueError) as err:
        detail = getattr(err, "stderr", "") or err
        raise SystemExit(
            f"error: could not fetch the Debian package {PACKAGE} ({detail}); install it "
            f"(apt-get install {PACKAGE}) or set TUXPAINT_STAMPS to its stamps folder"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return stamps


def captioned_stamps(folder: str) -> list[tuple[str, str]]:
    """(png path, caption) for every stamp with an English caption, one per distinct caption, sorted by path."""
    pairs, seen = [], set()
    for png in sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True)):
        stem = png[:-4]
        if stem.endswith(VARIANTS) or not os.path.isfile(stem + ".txt"):
            continue
        with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
            caption = f.readline().strip()
        key = caption.lower()
        if len(caption.split()) < 2 or "=" in caption or key in seen:
            continue
        seen.add(key)
        pairs.append((png, caption))
    return pairs


def on_white(path: str, size: int) -> Image.Image:
    """The stamp over white, centred on a square canvas, resized to size x size."""
    image = Image.open(path)
    image = image.convert("RGBA")
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.BICUBIC)


def held_out_paths(paths: list[str], folder: str, eval_n: int) -> set:
    """The eval_n stamps whose path inside the package hashes lowest: a split fixed by the package alone."""
    digest = lambda path: hashlib.sha1(os.path.relpath(path, folder).encode()).hexdigest()
    return set(sorted(paths, key=digest)[:eval_n])


def ensure_learning_data(size: int = 224, eval_n: int = 200, folder: str | None = None) -> dict[str, str]:
    """The prepared set, written on first use: {"train", "eval", "image_root", "pairs", "held_out"}."""
    out = os.path.join(cache_folder(), f"tuxpaint-{size}px-eval{eval_n}")
    paths = {"train": os.path.join(out, "train.json"), "eval": os.path.join(out, "eval.json"), "image_root": out}
    if not os.path.isfile(paths["eval"]):
        source = folder or stamps_folder()
        pairs = captioned_stamps(source)
        os.makedirs(cache_folder(), exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".tuxpaint.tmp-", dir=cache_folder())
        try:
            os.makedirs(os.path.join(scratch, "images"))
            train, evaluation = [], []
            held = held_out_paths([png for png, _ in pairs], source, eval_n)
            for i, (png, caption) in enumerate(pairs):
                name = f"images/{i:05d}.jpg"
                on_white(png, size).save(os.path.join(scratch, name), quality=92)
                if png in held:
                    evaluation.append({"image": name, "caption": [caption]})
                else:
                    train.append({"image": os.path.join(out, name), "image_id": i, "caption": caption})
            for path, entries in ((paths["train"], train), (paths["eval"], evaluation)):
                with open(os.path.join(scratch, os.path.basename(path)), "w") as f:
                    json.dump(entries, f, indent=0)
            os.rename(scratch, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    with open(paths["train"]) as f, open(paths["eval"]) as g:
        paths["pairs"], paths["held_out"] = len(json.load(f)), len(json.load(g))
    return paths
