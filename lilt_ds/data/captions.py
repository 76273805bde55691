"""Pretraining annotations in the original LilT format, read and validated before training.

Each JSON file holds a list of entries `{"image": "/abs/path.jpg", "image_id": ..., "caption":
"..." | ["...", ...]}`; `image_id` is optional and unused. A caption list means one caption per
entry is drawn each epoch. Several files are concatenated in the order given.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .bad_samples import BadSample
from .errors import DataError, format_list
from .image_root import ImageRoot, ImageRootSpec
from .images import find_missing_files
from .jsonfile import json_type_name, read_json_list
from .packed import PackedStrings



class CaptionTable:
    """The validated entries of one or more caption files: resolved image paths and captions,
    packed so that DataLoader workers share them, and the source file of every entry."""

    def __init__(self, sources: List[str], counts: List[int], paths: List[str],
                 captions: List[List[str]]):
        self.sources = list(sources)
        self._source_ends = np.cumsum(counts, dtype=np.int64)
        self._paths = PackedStrings(paths)
        self._captions = PackedStrings(c for entry in captions for c in entry)
        self._caption_ends = np.cumsum([len(entry) for entry in captions], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, index: int) -> str:
        return self._paths[index]

    def num_captions(self, index: int) -> int:
        start = int(self._caption_ends[index - 1]) if index > 0 else 0
        return int(self._caption_ends[index]) - start

    def caption(self, index: int, choice: int = 0) -> str:
        """Caption number `choice` of entry `index`."""
        start = int(self._caption_ends[index - 1]) if index > 0 else 0
        return self._captions[start + choice]

    def locate(self, index: int) -> Tuple[str, int]:
        """(source file, entry index inside that file) of a dataset index."""
        source = int(np.searchsorted(self._source_ends, index, side="right"))
        first = int(self._source_ends[source - 1]) if source > 0 else 0
        return self.sources[source], index - first

    def bad_sample(self, index: int, reason: str) -> BadSample:
        """Describe entry `index` as bad, with its file, entry number and image path."""
        file, entry = self.locate(index)
        return BadSample(index, file, entry, self.image_path(index), reason)

    def missing_images(self) -> List[BadSample]:
        """The entries whose image file does not exist (one existence check per entry)."""
        missing = find_missing_files([self.image_path(i) for i in range(len(self))])
        return [self.bad_sample(int(i), "file not found") for i in np.flatnonzero(missing)]


def load_caption_files(files: Sequence[str], image_root: ImageRootSpec = None,
                       clean: Optional[Callable[[str], str]] = None,
                       setting: str = "data.train_files",
                       root_setting: str = "data.image_root") -> CaptionTable:
    """Read and validate every file; `clean` (e.g. `pre_caption`) is applied to the stored
    captions. Raises DataError listing every invalid entry (file, entry index, fix)."""
    if isinstance(files, str):
        files = [files]
    if not files:
        raise DataError(f"{setting} is empty; list at least one caption JSON file.")
    root = ImageRoot(image_root, root_setting)
    problems: List[str] = []
    counts, paths, captions = [], [], []
    for source in files:
        entries = read_json_list(str(source), setting)
        if not entries:
            raise DataError(f"{source}: holds an empty list; remove the file from {setting} "
                            "or fill it.")
        counts.append(len(entries))
        for number, entry in enumerate(entries):
            where = f"{source}, entry {number}"
            path, errors = _entry_image(entry, root)
            texts, caption_errors = _entry_captions(entry, clean)
            problems.extend(f"{where}: {e}" for e in errors + caption_errors)
            paths.append(path or "")
            captions.append(texts)
    if problems:
        raise DataError(f"{len(problems)} invalid entries in {setting}:\n{format_list(problems)}")
    return CaptionTable([str(f) for f in files], counts, paths, captions)


def _entry_image(entry: dict, root: ImageRoot) -> Tuple[Optional[str], List[str]]:
    if "image" not in entry:
        return None, [f"missing key 'image' (the entry has keys: {_keys(entry)}); every entry "
                      'needs "image" (a path) and "caption".']
    image = entry["image"]
    if not isinstance(image, str) or not image:
        return None, [f"'image' must be a non-empty path string, found {json_type_name(image)} "
                      f"{image!r}; fix the entry."]
    resolved = root.resolve(image)
    if resolved is None:
        return None, [f"relative image path {image!r} and no image root to resolve it; "
                      f"{root.missing_root_fix()}."]
    return resolved, []


def _entry_captions(entry: dict, clean: Optional[Callable[[str], str]]) -> Tuple[List[str], List[str]]:
    if "caption" not in entry:
        return [], [f"missing key 'caption' (the entry has keys: {_keys(entry)}); every entry "
                    'needs "image" and "caption" (a string or a list of strings).']
    caption = entry["caption"]
    if isinstance(caption, str):
        caption = [caption]
        names = ["caption"]
    elif isinstance(caption, list):
        if not caption:
            return [], ["'caption' is an empty list; give at least one caption or drop the entry."]
        names = [f"caption {k}" for k in range(len(caption))]
    else:
        return [], [f"'caption' must be a string or a list of strings, found "
                    f"{json_type_name(caption)}; fix the entry."]
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
                errors.append(f"{name} {text!r} is empty after cleaning (it holds only "
                              "punctuation); write a caption or drop it.")
    return texts, errors


def _keys(entry: dict) -> str:
    return ", ".join(map(str, entry)) or "none"
