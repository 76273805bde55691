"""Zero-shot classification data: an ImageFolder-style directory, CIFAR's python pickles, or a JSON list
of {image, label}.

Directory: one sub-folder per class (sorted names are the classes, underscores read as spaces, or
``classnames="imagenet"``: ImageNet's synset folders named as OpenAI's CLIP named them), images inside.
CIFAR-10/100: the folder of the published pickles, named by their meta file. JSON: ``[{"image":
"path.jpg", "label": "dog" | 3}, ...]`` with relative paths resolved against ``image_root``; integer
labels need the class names (``classnames``), string labels name the classes themselves (sorted).
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
from .datasets import CifarImages, imagenet_names_for, is_cifar_folder

IMAGENET = "imagenet"  # classnames: ImageNet's synset folders, named as OpenAI's CLIP named them
NAMED_TEMPLATES = ("imagenet", "cifar")  # lilt_ds/configs/<name>_templates.txt: CLIP's prompt sets


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


def _from_folder(root: str, classes: list[str]):
    """Every image of the class folders ``classes`` of ``root``, and its class index."""
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
    return paths, labels


def _folder_classes(source: str, classnames, setting: str) -> tuple[list[str], list[str]] | None:
    """A folder source's layout, checked without reading an image: None for CIFAR's pickles, else its
    class folders (sorted) and their names (the folders', ImageNet's for synsets, or ``classnames``)."""
    if is_cifar_folder(source) is not None:
        if classnames == IMAGENET:
            raise DataError(f"{setting} = {source!r} is CIFAR: imagenet class names are for ImageNet's synset folders")
        return None
    classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    if not classes:
        raise DataError(
            f"{setting} = {source!r} has no class folder: it is in neither the ImageFolder layout (one sub-folder "
            f"per class: the images of class C in {os.path.join(source, 'C')}/) nor CIFAR's (test_batch and "
            "batches.meta, or test and meta): check the path"
        )
    if classnames == IMAGENET:
        return classes, imagenet_names_for(source, classes, setting)
    if classnames is not None:
        return classes, _named(list(classnames), len(classes), source)
    return classes, [c.replace("_", " ") for c in classes]


def _named(names: list[str], count: int, source: str) -> list[str]:
    if len(names) != count:
        raise DataError(f"{source} has {count} classes, and the class names file lists {len(names)}: one per class")
    return names


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
    source: str,
    transform,
    image_root: str | None = None,
    classnames: Sequence[str] | str | None = None,
    setting: str = "--data",
):
    """The images of a classification set in ``transform``: a ClassificationImages, or CifarImages for
    CIFAR's pickles. ``classnames``: None (the set's own), "imagenet", or a list (one per class)."""
    if not os.path.exists(source):
        raise DataError(
            f"{setting} = {source!r} does not exist: give a folder with one sub-folder per class, CIFAR's "
            "pickles, or a JSON list of {image, label}"
        )
    if source.endswith(".json"):
        paths, labels, names = _from_json(source, image_root, None if classnames == IMAGENET else classnames)
    else:
        found = _folder_classes(source, classnames, setting)
        if found is None:
            images = CifarImages(source, is_cifar_folder(source), transform)
            if classnames is not None:
                images.classnames = _named(list(classnames), len(images.classnames), source)
            return images
        classes, names = found
        paths, labels = _from_folder(source, classes)
    if not paths:
        raise DataError(f"classification data {source} is empty: it lists no image")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} images of {source} are missing, e.g. {missing[0]}")
    return ClassificationImages(paths, labels, names, transform)


def load_templates(spec: str) -> list[str]:
    """``imagenet`` (CLIP's 80 ImageNet prompts), ``cifar`` (its 18 CIFAR prompts), a file with one
    template per line, or one template."""
    if spec in NAMED_TEMPLATES:
        text = (resources.files("lilt_ds") / "configs" / f"{spec}_templates.txt").read_text()
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


def read_classnames(path: str | None) -> list[str] | str | None:
    """The class names of a file with one per line, "imagenet" as it is (ImageNet's synset folders), or None."""
    if path is None or path == IMAGENET:
        return path
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
    preprocess: dict | None = None,
    setting: str = "--data",
) -> tuple[ClassificationImages | CifarImages, list[str]]:
    """The images of a zero-shot classification set in the evaluation transform (``preprocess``: the
    model source's, see build_eval_transform), and its prompt templates: what ``launch/evaluate.py`` and
    ``eval.classification`` read."""
    from ..preprocessing.transforms import build_eval_transform

    transform = build_eval_transform(image_size, mean, std, preprocess)
    images = build_classification_data(source, transform, image_root, read_classnames(classnames_file), setting)
    return images, load_templates(templates)


def check_zeroshot(section) -> None:
    """``eval.classification`` names files that exist, a layout it reads and templates with a ``{}``:
    checked at load time (the class folders too, against ImageNet's synsets with ``classnames: imagenet``)."""
    if section.data is None:
        return
    for key, exists in (("data", os.path.exists), ("image_root", os.path.isdir)):
        path = getattr(section, key)
        if path is not None and not exists(path):
            raise DataError(f"eval.classification.{key} = {path!r} does not exist: check the path")
    if section.classnames not in (None, IMAGENET) and not os.path.isfile(section.classnames):
        raise DataError(
            f"eval.classification.classnames = {section.classnames!r} does not exist: give a file with one class "
            "name per line, or imagenet (ImageNet's synset folders)"
        )
    check_classification_source(section.data, read_classnames(section.classnames), "eval.classification.data")
    load_templates(section.templates)


def check_classification_source(source: str, classnames, setting: str) -> None:
    """What can be told of a classification source without reading images: its layout, and the class
    folders against the names asked for."""
    if source.endswith(".json"):
        return
    if not os.path.isdir(source):
        raise DataError(
            f"{setting} = {source!r}: expected a folder with one sub-folder per class, CIFAR's pickles, "
            "or a JSON list of {image, label}"
        )
    _folder_classes(source, classnames, setting)
