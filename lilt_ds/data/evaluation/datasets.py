"""The evaluation datasets `launch/evaluate.py --datasets NAME=PATH ...` knows, in their published layouts:
ImageNet-1k validation (synset folders, OpenAI's class names), CIFAR-10/100 (the python pickles), COCO and
Flickr30k retrieval (the Karpathy-split JSON of the original project), and any class folder or JSON."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"  # CLIP_benchmark's task names


@dataclass(frozen=True)
class DatasetKind:
    task: str
    layout: str  # imagenet | cifar10 | cifar100 | folder_or_json | retrieval_json
    templates: str  # the prompts when --templates is auto
    benchmark_name: str  # CLIP_benchmark's name of the dataset


DATASETS = {
    "imagenet": DatasetKind(CLASSIFICATION, "imagenet", "imagenet", "imagenet1k"),
    "cifar10": DatasetKind(CLASSIFICATION, "cifar10", "cifar", "cifar10"),
    "cifar100": DatasetKind(CLASSIFICATION, "cifar100", "cifar", "cifar100"),
    "coco": DatasetKind(RETRIEVAL, "retrieval_json", "", "mscoco_captions"),
    "flickr30k": DatasetKind(RETRIEVAL, "retrieval_json", "", "flickr30k"),
    "classification": DatasetKind(CLASSIFICATION, "folder_or_json", "a photo of a {}.", "classification"),
    "retrieval": DatasetKind(RETRIEVAL, "retrieval_json", "", "retrieval"),
}
"""NAME of ``NAME=PATH`` (``NAME:LABEL=PATH`` names a second set of the same kind): what it is."""


def parse_dataset_spec(text: str) -> tuple[str, DatasetKind, str]:
    """``NAME[:LABEL]=PATH`` -> (the label results are filed under, the kind, the path); DataError naming
    the known names for anything else."""
    name, sep, path = text.partition("=")
    kind_name, _, label = name.partition(":")
    if not sep or not path or kind_name not in DATASETS:
        raise DataError(
            f"--datasets {text!r}: expected NAME=PATH with NAME one of {', '.join(DATASETS)} "
            "(NAME:LABEL=PATH for a second set of a kind, e.g. classification:pets=/d/pets)"
        )
    return label or kind_name, DATASETS[kind_name], path


def dataset_name(path: str) -> str:
    """A results file's name for a set given by its path: the file's stem, or the folder's name."""
    base = os.path.basename(os.path.normpath(path))
    return os.path.splitext(base)[0] if os.path.isfile(path) else base


# ------------------------------------------------------------------------------ ImageNet's class names
def imagenet_classnames() -> dict[str, str]:
    """synset -> OpenAI's CLIP class name (the names OpenCLIP and CLIP_benchmark use), 1,000 in index order."""
    text = (resources.files("lilt_ds") / "data" / "imagenet_classnames.tsv").read_text()
    return dict(line.split("\t") for line in text.splitlines() if line)


def imagenet_names_for(folder: str, classes: list[str], setting: str) -> list[str]:
    """The class names of an ImageNet-layout folder whose sub-folders are ``classes`` (synsets)."""
    names = imagenet_classnames()
    if sorted(classes) != list(names):
        unknown = [c for c in classes if c not in names]
        detail = (
            f"{len(unknown)} are not ImageNet synsets, e.g. {unknown[0]!r}"
            if unknown
            else f"it has {len(classes)} of the 1,000 synsets"
        )
        raise DataError(
            f"{setting}: imagenet class names need the 1,000 synset folders (n01440764/ ... n15075141/) of "
            f"ImageNet-1k's validation set, and {folder} has {len(classes)} sub-folders: {detail}. Sort the "
            "validation images into their synset folders, or give a class-names file instead"
        )
    return [names[c] for c in classes]


# ------------------------------------------------------------------------------ CIFAR's python pickles
CIFAR_FILES = {
    "cifar10": ("test_batch", "batches.meta", b"labels", b"label_names"),
    "cifar100": ("test", "meta", b"fine_labels", b"fine_label_names"),
}


def is_cifar_folder(folder: str) -> str | None:
    """cifar10 or cifar100 when ``folder`` holds that set's python pickles (test split and meta), else None."""
    for name, (test, meta, _, _) in CIFAR_FILES.items():
        if os.path.isfile(os.path.join(folder, test)) and os.path.isfile(os.path.join(folder, meta)):
            return name
    return None


class CifarImages(Dataset):
    """The test split of CIFAR-10/100 from the python pickles: ``dataset[i] -> {"image", "index"}``,
    ``labels``, and ``classnames`` from the meta file as published (what torchvision and CLIP_benchmark use)."""

    def __init__(self, folder: str, which: str, transform):
        test, meta, label_key, names_key = CIFAR_FILES[which]
        try:
            with open(os.path.join(folder, test), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            with open(os.path.join(folder, meta), "rb") as f:
                names = pickle.load(f, encoding="bytes")[names_key]
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [int(x) for x in batch[label_key]]
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise DataError(
                f"{folder}: not the {which} python-pickle layout ({test} and {meta} as published in "
                f"cifar-{which[5:]}-python.tar.gz): {type(err).__name__}: {err}"
            ) from None
        if len(labels) != len(pixels) or not all(0 <= x < len(names) for x in labels):
            raise DataError(f"{folder}/{test}: {len(pixels)} images and {len(labels)} labels do not match {meta}")
        self.pixels, self.labels, self.transform = pixels, labels, transform
        self.classnames = [n.decode() for n in names]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.transform(Image.fromarray(self.pixels[index])), "index": index}
