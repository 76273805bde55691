"""Image transforms: training augmentation by preset (the original LilT recipe, OpenCLIP's, none) with
every parameter settable, and the evaluation resize; the vision tower's mean/std passed in."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T

from ...schema import AugmentSettings, as_section
from ..errors import DataError

_RANDAUGMENT_SECTION = re.compile(r"(m|n|mmax|inc)\d+|(p|mstd)\d+(\.\d*)?|t[a-z0-9]+")

# The original LilT RandomAugment op set (timm names). It leaves hues alone: colour words in
# captions stay true, which timm's default set (Invert, Solarize, Color, ...) would break.
LILT_RANDAUGMENT_OPS = [
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "Rotate",
]


# What each `data.augment.preset` means; a key set in `data.augment` replaces the preset's value.
# lilt: the original LilT recipe. openclip: OpenCLIP's default train transform (a mild crop, nothing
# else). none: the evaluation transform (a square resize), so training sees what evaluation sees.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "lilt": {
        "scale": [0.2, 1.0],
        "ratio": [3 / 4, 4 / 3],
        "interpolation": "bicubic",
        "hflip": True,
        "randaugment": "rand-m7-n2",
        "color_jitter": 0.0,
        "grayscale": 0.0,
    },
    "openclip": {
        "scale": [0.9, 1.0],
        "ratio": [3 / 4, 4 / 3],
        "interpolation": "bicubic",
        "hflip": False,
        "randaugment": False,
        "color_jitter": 0.0,
        "grayscale": 0.0,
    },
    "none": {
        "scale": None,
        "ratio": None,
        "interpolation": "bicubic",
        "hflip": False,
        "randaugment": False,
        "color_jitter": 0.0,
        "grayscale": 0.0,
    },
}
INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def resolve_augment(augment: AugmentSettings | Mapping[str, Any] | None = None, **changes) -> AugmentSettings:
    """The complete augmentation of `data.augment` (typed, or a mapping of its keys), with `changes`
    on top: its preset's values, replaced by those it sets (null keeps the preset's), each checked;
    the error names the key, the value and what it takes."""
    given = dataclasses.asdict(as_section(AugmentSettings, augment, "data.augment"))
    given.update(changes)
    preset = given["preset"]
    out = {"preset": preset, **copy.deepcopy(AUGMENT_PRESETS[preset])}
    out.update({k: v for k, v in given.items() if v is not None and k != "preset"})
    for key in ("scale", "ratio"):
        if out[key] is None:
            continue
        if preset == "none":
            raise DataError(
                f"data.augment.{key} = {out[key]!r}: preset none does not crop (it resizes "
                "as evaluation does); pick preset lilt or openclip to crop."
            )
        out[key] = _range(out[key], key)
    if out["scale"] is not None and out["scale"][1] > 1:
        raise DataError(
            f"data.augment.scale = {list(out['scale'])}: the crop's share of the image "
            "area is at most 1 (OpenCLIP's default: [0.9, 1.0])."
        )
    if out["interpolation"] not in INTERPOLATIONS:
        raise DataError(
            f"data.augment.interpolation = {out['interpolation']!r}: expected one of {', '.join(INTERPOLATIONS)}."
        )
    if not isinstance(out["hflip"], bool):
        raise DataError(f"data.augment.hflip = {out['hflip']!r}: expected true or false.")
    if out["randaugment"] is not False and not isinstance(out["randaugment"], str):
        raise DataError(
            f"data.augment.randaugment = {out['randaugment']!r}: expected a timm RandAugment "
            'string such as "rand-m7-n2", or false (off).'
        )
    out["color_jitter"] = _jitter(out["color_jitter"])
    gray = out["grayscale"]
    if isinstance(gray, bool) or not isinstance(gray, (int, float)) or not 0 <= gray <= 1:
        raise DataError(
            f"data.augment.grayscale = {gray!r}: expected the probability (0 to 1) of turning an image grey (0: off)."
        )
    out["grayscale"] = float(gray)
    return AugmentSettings(**out)


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentSettings | Mapping[str, Any] | None = None,
    **changes,
):
    """The training transform of `augment` (`data.augment`; None: the lilt preset), with
    `changes` (its keys, e.g. hflip=False) on top: RandomResizedCrop(scale, ratio) or, with preset
    none, a square resize -> [horizontal flip] -> [colour jitter] -> [grayscale] -> [RandAugment]
    -> ToTensor + Normalize(mean, std).

    `randaugment` is a timm config string ("rand-m7-n2": magnitude 7, two ops) or false. Unless the
    string picks a timm op set itself (a "-t..." section), the ops are `LILT_RANDAUGMENT_OPS`."""
    _check_size(image_size)
    aug = resolve_augment(augment, **changes)
    interpolation = INTERPOLATIONS[aug.interpolation]
    if aug.scale is None and aug.ratio is None:
        steps = [T.Resize((image_size, image_size), interpolation=interpolation)]
    else:
        steps = [
            T.RandomResizedCrop(
                image_size,
                scale=aug.scale or (0.08, 1.0),
                ratio=aug.ratio or (3 / 4, 4 / 3),
                interpolation=interpolation,
            )
        ]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if any(aug.color_jitter):
        brightness, contrast, saturation, hue = aug.color_jitter
        steps.append(T.ColorJitter(brightness, contrast, saturation, hue))
    if aug.grayscale > 0:
        steps.append(T.RandomGrayscale(aug.grayscale))
    if aug.randaugment:
        steps.append(_randaugment(aug.randaugment, mean))
    steps.append(ToNormalizedTensor(mean, std))
    return T.Compose(steps)


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize to image_size x image_size (bicubic) -> ToTensor + Normalize(mean, std)."""
    _check_size(image_size)
    return T.Compose(
        [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC), ToNormalizedTensor(mean, std)]
    )


def _range(value, key: str) -> list[float]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise DataError(
            f"data.augment.{key} = {value!r}: expected [low, high] with 0 < low <= high "
            f"(OpenCLIP's default {key}: {[round(v, 3) for v in AUGMENT_PRESETS['openclip'][key]]})."
        )
    return [float(value[0]), float(value[1])]


def _jitter(value) -> list[float]:
    """A strength s (brightness, contrast and saturation by s, hue kept) or [b, c, s, h]; 0 is off."""
    fix = "expected a strength >= 0 (brightness, contrast, saturation; 0: off) or [b, c, s, h] with hue <= 0.5"
    numbers = [value] * 3 + [0.0] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (
        not isinstance(numbers, (list, tuple))
        or len(numbers) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in numbers)
        or numbers[3] > 0.5
    ):
        raise DataError(f"data.augment.color_jitter = {value!r}: {fix}.")
    return [float(v) for v in numbers]


def _randaugment(config: str, mean: Sequence[float]):
    fix = (
        'use a timm RandAugment string such as "rand-m7-n2" (m: magnitude 0-10, n: ops per '
        "image), or false to turn it off"
    )
    parts = config.split("-") if isinstance(config, str) else []
    if not parts or parts[0] != "rand" or not all(_RANDAUGMENT_SECTION.fullmatch(p) for p in parts[1:]):
        raise DataError(f"data.augment.randaugment = {config!r} is not a RandAugment string; {fix}.")
    picks_op_set = any(part.startswith("t") for part in parts[1:])
    hparams = {"translate_pct": 0.45, "img_mean": tuple(int(round(255 * m)) for m in mean)}
    try:
        return rand_augment_transform(config, hparams, transforms=None if picks_op_set else LILT_RANDAUGMENT_OPS)
    except (AssertionError, ValueError, KeyError) as err:
        raise DataError(
            f"data.augment.randaugment = {config!r} does not parse ({err or 'bad section'}); {fix}."
        ) from None


class ToNormalizedTensor:
    """ToTensor followed by Normalize(mean, std), computed in numpy: single-threaded, so it does
    not go through torch's intra-op thread pool, which on a busy machine makes such small ops
    many times slower in the main process (num_workers=0)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise DataError(
                f"image mean {list(mean)} / std {list(std)}: expected three values each "
                "(RGB) and a positive std; take them from the vision tower's config."
            )
        self.scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
        self.shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)

    def __call__(self, image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.float32) * self.scale - self.shift
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={list(self.shift / self.scale / 255)}, std={list(1 / self.scale / 255)})"


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image size {image_size!r}: expected a positive number of pixels.")
