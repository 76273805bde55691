"""Converting caption JSON files in the original LilT format into tar shards (WebDataset layout).

    python launch/make_shards.py --json train.json [more.json ...] --out DIR --shard-size 10000
                                 [--image-root ROOT] [--skip-missing]

writes DIR/shard-000000.tar, DIR/shard-000001.tar, ... and DIR/sizes.json (samples per shard), and
prints the `data.train_shards` pattern to train on. Entry k of the concatenated files becomes
sample `{k:09d}`: the image file's bytes as they are (`.jpg`, `.png`, ...) and its caption as
`.txt`, or its captions as `.json` (`{"caption": [...]}`) when it has several. Captions are stored
as written and cleaned when training reads them, and the key keeps the entry's index, so the
shards train on the same samples as the JSON files. Image paths are checked first; missing ones
stop the conversion unless --skip-missing leaves them out (and counts them).
"""

import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from ...fileio import atomic_path
from ..errors import DataError, format_list
from ..index.captions import load_caption_files
from ..index.image_root import ImageRootSpec
from ..preprocessing.images import SHARD_IMAGE_KEYS
from .files import SIZES_FILE, webdataset

SHARD_NAME = "shard-{:06d}.tar"


def write_shards(
    files: Sequence[str], out: str, shard_size: int, image_root: ImageRootSpec = None, skip_missing: bool = False
) -> dict:
    """Convert `files` into shards of `shard_size` samples in the folder `out` (new or empty of
    shards). Returns `{"train_shards": pattern, "shards", "samples", "skipped_missing"}`."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size {shard_size!r}: expected a positive number of samples per shard.")
    webdataset()
    files = [files] if isinstance(files, str) else list(files)
    out = os.path.abspath(out)
    if glob.glob(os.path.join(out, "shard-*.tar")) or os.path.exists(os.path.join(out, SIZES_FILE)):
        raise DataError(f"{out} already holds shards; write into a new or empty folder.")
    table = load_caption_files(files, image_root, clean=None, setting="--json", root_setting="--image-root", cache=None)
    unsupported = [
        table.bad_sample(i, "not a .jpg, .jpeg, .png or .webp image").describe()
        for i in range(len(table))
        if _image_type(table.image_path(i)) is None
    ]
    if unsupported:
        raise DataError(
            f"{len(unsupported)} images of an unsupported type:\n{format_list(unsupported)}\n"
            "Convert them to JPEG or PNG first."
        )
    missing = table.missing_images()
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(table)} images are missing:\n"
            f"{format_list([s.describe() for s in missing])}\n"
            "Fix the paths (--image-root ROOT resolves relative ones) or pass "
            "--skip-missing to leave them out."
        )
    present = np.ones(len(table), dtype=bool)
    present[[s.index for s in missing]] = False
    kept = np.flatnonzero(present)
    if not len(kept):
        raise DataError(
            f"every image of {', '.join(map(str, files))} is missing: nothing to convert. "
            "Fix the paths (--image-root ROOT resolves relative ones)."
        )
    os.makedirs(out, exist_ok=True)
    sizes = {}
    for number, start in enumerate(range(0, len(kept), shard_size)):
        name = SHARD_NAME.format(number)
        entries = kept[start : start + shard_size].tolist()
        _write_shard(os.path.join(out, name), table, entries)
        sizes[name] = len(entries)
    with open(os.path.join(out, SIZES_FILE), "w", encoding="utf-8") as handle:
        json.dump(sizes, handle, indent=1)
    pattern = os.path.join(out, "shard-{" + f"{0:06d}..{len(sizes) - 1:06d}" + "}.tar")
    return {"train_shards": pattern, "shards": len(sizes), "samples": len(kept), "skipped_missing": len(missing)}


def _write_shard(path: str, table, entries: list[int]) -> None:
    """One tar, written under a temporary name and renamed: an interrupted conversion leaves no
    half shard under a shard's name."""
    with atomic_path(path) as scratch, open(scratch, "wb") as stream:
        writer = webdataset().TarWriter(stream, encoder=False, mtime=0.0)
        for index in entries:
            image = table.image_path(index)
            with open(image, "rb") as source:
                sample = {"__key__": f"{index:09d}", _image_type(image): source.read()}
            captions = table.captions(index)
            if len(captions) == 1:
                sample["txt"] = captions[0].encode("utf-8")
            else:
                sample["json"] = json.dumps({"caption": captions}, ensure_ascii=False).encode("utf-8")
            writer.write(sample)
        writer.close()


def _image_type(path: str) -> str | None:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    return extension if extension in SHARD_IMAGE_KEYS else None
