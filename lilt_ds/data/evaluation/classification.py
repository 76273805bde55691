"""Zero-shot classification data: an ImageFolder-style directory or a JSON list of {image, label}.

Directory: one sub-folder per class (sorted names are the classes, underscores read as spaces),
images inside. JSON: ``[{"image": "path.jpg", "label": "dog" | 3}, ...]`` with relative paths
resolved against ``image_root``; integer labels need the class names (``classnames``), string
labels name the classes themselves (sorted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources

from torch.utils.data import Dataset

from ...errors import ConfigError
from ..errors import DataError
from ..preprocessing.images import IMAGE_EXTENSIONS, open_rgb


class ClassificationImages(Dataset):
    """``dataset[i] -> {"image": FloatTensor[3,H,W], "index": i}``; ``labels[i]`` its class index."""

    def __init__(self, paths: list[str], labels: list[int], classnames: list[str], transform):
        self.paths, self.labels, self.classnames, self.transform = paths, labels, classnames, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = open_rgb(self.paths[index])
        except Exception as err:  # noqa: BLE001 - any decoding failure of a user's file
            raise DataError(
                f"image {self.paths[index]} (entry {index}) cannot be read: {err}. Replace or remove it."
            ) from err
        return {"image": self.transform(image), "index": index}


def _from_folder(root: str):
    if not os.path.isdir(root):
        raise DataError(
            f"classification data {root} does not exist: give a folder with one sub-folder "
            "per class, or a JSON list of {image, label}"
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(
            f"classification folder {root} has no class folder: put the images of class C in {os.path.join(root, 'C')}/"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"class folder {os.path.join(root, name)} holds no image "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder"
            )
        paths += [os.path.join(root, name, f) for f in files]
        labels += [label] * len(files)
    return paths, labels, [c.replace("_", " ") for c in classes]


def _from_json(path: str, image_root: str | None, classnames: Sequence[str] | None):
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"classification file {path} cannot be read as JSON: {e}") from None
    if not isinstance(entries, list):
        raise DataError(f"classification file {path} must hold a JSON list of {{image, label}}")
    if not entries:
        raise DataError(f"classification data {path} is empty: it lists no image")
    if entries and all(isinstance(e, dict) and isinstance(e.get("label"), str) for e in entries):
        classnames = sorted({e["label"] for e in entries})
    elif not classnames:
        raise DataError(f"{path} has integer labels: give the class names (--classnames FILE, one per line)")
    index = {name: i for i, name in enumerate(classnames)}
    paths, labels = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f'{path}, entry {i}: expected {{"image": ..., "label": ...}}, got {entry!r}')
        label = index.get(entry["label"], entry["label"])
        if not isinstance(label, int) or not 0 <= label < len(classnames):
            raise DataError(f"{path}, entry {i}: label {entry['label']!r} is not one of the {len(classnames)} classes")
        image = entry["image"]
        if not os.path.isabs(image):
            if image_root is None:
                raise DataError(f"{path}, entry {i}: relative image path {image!r} needs --image_root")
            image = os.path.join(image_root, image)
        paths.append(image)
        labels.append(label)
    return paths, labels, list(classnames)


def build_classification_data(
    source: str, transform, image_root: str | None = None, classnames: Sequence[str] | None = None
) -> ClassificationImages:
    paths, labels, names = (
        _from_json(source, image_root, classnames) if source.endswith(".json") else _from_folder(source)
    )
    if not paths:
        raise DataError(f"classification data {source} is empty: it lists no image")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} images of {source} are missing, e.g. {missing[0]}")
    return ClassificationImages(paths, labels, names, transform)


def load_templates(spec: str) -> list[str]:
    """``imagenet`` (the 80 CLIP ImageNet prompts), a file with one template per line, or one template."""
    if spec == "imagenet":
        text = (resources.files("lilt_ds") / "configs" / "imagenet_templates.txt").read_text()
    elif os.path.isfile(spec):
        with open(spec) as f:
            text = f.read()
    else:
        text = spec
    templates = [t.strip() for t in text.splitlines() if t.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(
            f"prompt template(s) {bad or spec!r} need a '{{}}' where the class name goes, as in 'a photo of a {{}}.'"
        )
    return templates


def read_classnames(path: str | None) -> list[str] | None:
    """The class names of a file with one per line (for JSON data with integer labels), or None."""
    if path is None:
        return None
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise DataError(f"class names file {path} cannot be read: {err}") from None


def build_zeroshot_data(
    source: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_root: str | None = None,
    classnames_file: str | None = None,
    templates: str = "a photo of a {}.",
) -> tuple[ClassificationImages, list[str]]:
    """The images of a zero-shot classification set in the evaluation transform, and its prompt
    templates: what ``launch/evaluate.py --task classification`` and ``eval.classification`` read."""
    from ..preprocessing.transforms import build_eval_transform

    transform = build_eval_transform(image_size, mean, std)
    images = build_classification_data(source, transform, image_root, read_classnames(classnames_file))
    return images, load_templates(templates)


def check_zeroshot(section) -> None:
    """``eval.classification`` names files that exist and templates with a ``{}``: checked at load time."""
    if section.data is None:
        return
    for key, exists in (("data", os.path.exists), ("image_root", os.path.isdir), ("classnames", os.path.isfile)):
        path = getattr(section, key)
        if path is not None and not exists(path):
            raise DataError(f"eval.classification.{key} = {path!r} does not exist: check the path")
    if not section.data.endswith(".json") and not os.path.isdir(section.data):
        raise DataError(
            f"eval.classification.data = {section.data!r}: expected a folder with one sub-folder "
            "per class or a JSON list of {image, label}"
        )
    load_templates(section.templates)
