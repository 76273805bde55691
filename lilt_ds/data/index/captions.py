"""Pretraining annotations in the original LilT format, read and validated before training.

Each JSON file holds a list of entries `{"image": "/abs/path.jpg", "image_id": ..., "caption":
"..." | ["...", ...]}`; `image_id` is optional and unused. A caption list means one caption per
entry is drawn each epoch. Several files are concatenated in the order given.

Files are streamed (constant memory) into a few packed arrays, which are cached in a
memory-mapped file beside the JSON (see `index_cache`): a later run maps the cache in a fraction of
a second, and every process of the machine shares its pages. A table of millions of entries thus
holds no per-entry Python object, and DataLoader workers never copy it.
"""

import functools
import hashlib
import inspect
import json
import os
from array import array
from collections.abc import Callable, Sequence

import numpy as np

from ..bad_samples import BadSample
from ..errors import DataError, format_list
from ..preprocessing.images import find_missing_files
from .array_file import ArrayFile
from .cache import cached_index, source_fingerprint
from .image_root import ImageRoot, ImageRootSpec
from .image_store import StoreWriter, store_file
from .jsonfile import iter_json_list, json_type_name
from .packed import PackedPaths, PackedPathsBuilder, PackedStrings, PackedStringsBuilder, smallest_offset_dtype
from .tables import iter_table_entries, table_kind

# Bump when the arrays of a caption index change meaning: older caches are then rebuilt.
INDEX_FORMAT = 1
_EXISTENCE_CHUNK = 100_000
_PROBLEMS_KEPT = 10


class CaptionTable:
    """The validated entries of one or more caption files: resolved image paths and captions,
    packed so that DataLoader workers share them, and the source file of every entry."""

    def __init__(self, sources: list[str], counts: list[int], paths: list[str], captions: list[list[str]]):
        builder = _TableBuilder()
        for path, texts in zip(paths, captions):
            builder.add(path, texts)
        self._attach(list(sources), builder.arrays(counts))

    @classmethod
    def from_index(cls, sources: list[str], index: ArrayFile | dict[str, np.ndarray]) -> "CaptionTable":
        """A table over arrays built by `load_caption_files` (a mapped file or in memory)."""
        table = cls.__new__(cls)
        table._attach(list(sources), index)
        return table

    def _attach(self, sources: list[str], index) -> None:
        self.sources = sources
        self._index = index
        arrays = index.arrays if isinstance(index, ArrayFile) else index
        self._source_ends = arrays["source_ends"]
        self._paths = PackedPaths(arrays, "path")
        self._captions = PackedStrings.from_arrays(arrays, "caption")
        self._caption_ends = arrays["entry_caption_ends"]

    def __reduce__(self):
        # A mapped index pickles as its file name (ArrayFile), so a spawned worker maps it again.
        return CaptionTable.from_index, (self.sources, self._index)

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, index: int) -> str:
        return self._paths[index]

    def num_captions(self, index: int) -> int:
        return int(self._caption_ends[index]) - self._first_caption(index) if len(self._caption_ends) else 1

    def caption(self, index: int, choice: int = 0) -> str:
        """Caption number `choice` of entry `index`."""
        return self._captions[self._first_caption(index) + choice]

    def _first_caption(self, index: int) -> int:
        if not len(self._caption_ends):  # one caption per entry: the table stores no offsets
            return index
        return int(self._caption_ends[index - 1]) if index > 0 else 0

    def captions(self, index: int) -> list[str]:
        """Every caption of entry `index`."""
        return [self.caption(index, choice) for choice in range(self.num_captions(index))]

    def locate(self, index: int) -> tuple[str, int]:
        """(source file, entry index inside that file) of a dataset index."""
        source = int(np.searchsorted(self._source_ends, index, side="right"))
        first = int(self._source_ends[source - 1]) if source > 0 else 0
        return self.sources[source], index - first

    def bad_sample(self, index: int, reason: str) -> BadSample:
        """Describe entry `index` as bad, with its file, entry number and image path."""
        file, entry = self.locate(index)
        return BadSample(index, file, entry, self.image_path(index), reason)

    def missing_images(self) -> list[BadSample]:
        """The entries whose image file does not exist (one existence check per entry, a chunk of
        paths at a time)."""
        missing = []
        for start in range(0, len(self), _EXISTENCE_CHUNK):
            found = find_missing_files(self._paths.slice(start, start + _EXISTENCE_CHUNK))
            missing.extend(start + int(i) for i in np.flatnonzero(found))
        return [self.bad_sample(i, "file not found") for i in missing]

    @property
    def mapped_file(self) -> str | None:
        """The cache file the table is mapped from; None for a table held in memory."""
        return self._index.path if isinstance(self._index, ArrayFile) else None

    def make_resident(self) -> None:
        """Map every page of a cached table into this process now (see
        `ArrayFile.touch_all_pages`); DataLoader workers call it when they start."""
        if isinstance(self._index, ArrayFile):
            self._index.touch_all_pages()


class _TableBuilder:
    """Entries appended one by one into the packed arrays of a CaptionTable."""

    def __init__(self):
        self._paths = PackedPathsBuilder()
        self._captions = PackedStringsBuilder()
        self._caption_ends = array("q")

    def add(self, path: str, captions: list[str]) -> None:
        self._paths.append(path)
        for text in captions:
            self._captions.append(text)
        self._caption_ends.append(len(self._captions))

    def arrays(self, counts: list[int]) -> dict[str, np.ndarray]:
        ends = np.array(self._caption_ends, dtype=np.int64)
        if np.array_equal(ends, np.arange(1, len(ends) + 1)):
            ends = ends[:0]  # one caption per entry: offsets would only repeat the entry index
        return {
            "source_ends": np.cumsum(counts, dtype=np.int64),
            "entry_caption_ends": ends.astype(smallest_offset_dtype(len(self._captions))),
            **self._paths.arrays("path"),
            **self._captions.arrays("caption"),
        }


def load_caption_files(
    files: Sequence[str],
    image_root: ImageRootSpec = None,
    clean: Callable[[str], str] | None = None,
    setting: str = "data.train_files",
    root_setting: str = "data.image_root",
    cache: str | None = "auto",
    table=None,
) -> CaptionTable:
    """Read and validate every file; `clean` (e.g. `pre_caption`) is applied to the stored
    captions. Raises DataError listing every invalid entry (file, entry index, fix).

    `cache` ("auto", a folder, or None) says where the packed table is cached (see
    `index.cache.cached_index`); a `clean` function that cannot be identified across runs (a
    lambda, a local function) builds the table in memory instead."""
    if isinstance(files, str):
        files = [files]
    if not files:
        raise DataError(f"{setting} is empty; list at least one caption JSON file.")
    root = ImageRoot(image_root, root_setting)
    sources = [str(f) for f in files]
    for source in sources:
        if not (os.path.isfile(source) or table_kind(source) == "datasets"):
            raise DataError(f"{source}: file not found (given in {setting}). Fix the path in {setting}.")
    columns = (
        (table.image_key, table.caption_key, table.separator) if table is not None else ("filepath", "title", None)
    )
    identity = json.dumps([[os.path.abspath(s) for s in sources], source_fingerprint(sources), columns])
    store = store_file(hashlib.sha256(identity.encode()).hexdigest()[:24])
    build = functools.partial(_read_entries, sources, root, clean, setting, columns, store)
    clean_identity = _callable_identity(clean)
    if clean_identity is None:
        cache = None
    root_spec = os.fspath(image_root) if isinstance(image_root, os.PathLike) else image_root
    settings = {"format": INDEX_FORMAT, "image_root": root_spec, "clean": clean_identity}
    if any(table_kind(source) for source in sources):
        settings["table"] = list(columns)
    return CaptionTable.from_index(sources, cached_index(sources, settings, build, cache, "caption-index"))


def _read_entries(
    sources: list[str],
    root: ImageRoot,
    clean: Callable[[str], str] | None,
    setting: str,
    columns: tuple,
    store: str,
) -> dict[str, np.ndarray]:
    """Stream and validate every entry (of a JSON file, or a row of a table) into packed arrays;
    every invalid entry is counted and the first ones are quoted in the error. Images stored as
    bytes in a table go into the image store file ``store``."""
    builder, counts = _TableBuilder(), []
    problems: list[str] = []
    invalid = 0
    stored = StoreWriter(store)
    for source in sources:
        count = 0
        entries = (
            iter_table_entries(source, *columns, setting) if table_kind(source) else iter_json_list(source, setting)
        )
        for count, entry in enumerate(entries, start=1):
            if table_kind(source) and isinstance(entry.get("image"), bytes):
                path, errors = (
                    (stored.add(entry["image"]), []) if entry["image"] else (None, ["the stored image is empty"])
                )
            else:
                path, errors = _entry_image(entry, root)
            texts, caption_errors = entry_captions(entry, clean)
            if errors or caption_errors:
                invalid += len(errors) + len(caption_errors)
                problems.extend(f"{source}, entry {count - 1}: {e}" for e in errors + caption_errors)
                del problems[_PROBLEMS_KEPT:]
            builder.add(path or "", texts)
        if count == 0:
            raise DataError(f"{source}: holds an empty list; remove the file from {setting} or fill it.")
        counts.append(count)
    if invalid:
        raise DataError(
            f"{invalid} invalid entries in {setting}:\n{format_list(problems, _PROBLEMS_KEPT, total=invalid)}"
        )
    stored.close()
    return builder.arrays(counts)


def _callable_identity(function: Callable | None) -> str | None:
    """A name for a caption cleaning function that is the same in every run while the function
    and its module's code are (a cached table holds cleaned captions); None when there is none."""
    if function is None:
        return "none"
    if isinstance(function, functools.partial):
        inner = _callable_identity(function.func)
        arguments = repr((function.args, sorted(function.keywords.items())))
        return None if inner is None or " at 0x" in arguments else f"{inner}{arguments}"
    name = getattr(function, "__qualname__", "<")
    try:
        source = inspect.getsourcefile(function)
    except TypeError:
        return None
    if "<" in name or source is None or not os.path.isfile(source):
        return None  # a lambda or local function: two of them cannot be told apart
    with open(source, "rb") as handle:
        code = hashlib.sha256(handle.read()).hexdigest()[:16]
    return f"{function.__module__}.{name}@{code}"


def _entry_image(entry: dict, root: ImageRoot) -> tuple[str | None, list[str]]:
    if "image" not in entry:
        return None, [
            f"missing key 'image' (the entry has keys: {_keys(entry)}); every entry "
            'needs "image" (a path) and "caption".'
        ]
    image = entry["image"]
    if not isinstance(image, str) or not image:
        return None, [
            f"'image' must be a non-empty path string, found {json_type_name(image)} {image!r}; fix the entry."
        ]
    resolved = root.resolve(image)
    if resolved is None:
        return None, [f"relative image path {image!r} and no image root to resolve it; {root.missing_root_fix()}."]
    return resolved, []


def entry_captions(entry: dict, clean: Callable[[str], str] | None) -> tuple[list[str], list[str]]:
    """The (cleaned) captions of an entry and what is wrong with them; the tar shard reader checks
    its `.txt` / `.json` captions with it too."""
    if "caption" not in entry:
        return [], [
            f"missing key 'caption' (the entry has keys: {_keys(entry)}); every entry "
            'needs "image" and "caption" (a string or a list of strings).'
        ]
    caption = entry["caption"]
    if isinstance(caption, str):
        caption = [caption]
        names = ["caption"]
    elif isinstance(caption, list):
        if not caption:
            return [], ["'caption' is an empty list; give at least one caption or drop the entry."]
        names = [f"caption {k}" for k in range(len(caption))]
    else:
        return [], [f"'caption' must be a string or a list of strings, found {json_type_name(caption)}; fix the entry."]
    texts, errors = [], []
    for name, text in zip(names, caption):
        if not isinstance(text, str):
            errors.append(f"{name} is a {json_type_name(text)}, expected a string; fix the entry.")
        elif not text.strip():
            errors.append(f"{name} is empty; write a caption or drop it.")
        else:
            cleaned = clean(text) if clean is not None else text
            if cleaned:
                texts.append(cleaned)
            else:
                errors.append(
                    f"{name} {text!r} is empty after cleaning (it holds only punctuation); write a caption or drop it."
                )
    return texts, errors


def _keys(entry: dict) -> str:
    return ", ".join(map(str, entry)) or "none"
