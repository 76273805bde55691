"""Image transforms: training augmentation by preset (the original LilT recipe, OpenCLIP's, none) with
every parameter settable, and the evaluation resize; the vision tower's mean/std passed in."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms.functional import pil_modes_mapping
from torchvision.transforms.v2 import functional as F2

from ...schema import AugmentSettings, as_section
from ..errors import DataError
from .device_decode import EncodedCrop
from .images import decode_jpeg_rgb, encoded_bytes, largest_reduction, load_rgb
from .source_transforms import source_eval_transform

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
    normalize: bool = False,
    decode: str = "cpu",
    **changes,
) -> TrainTransform:
    """The training transform of `augment` (`data.augment`; None: the lilt preset), with `changes`
    (its keys, e.g. hflip=False) on top; see TrainTransform. ``normalize``: float output normalised
    with (mean, std) in the worker, else uint8 pixels (normalised on the device: `normalize_pixels`).
    ``decode``: `data.decode`; device: JPEGs come out as EncodedCrops (device_decode.py)."""
    _check_size(image_size)
    return TrainTransform(image_size, mean, std, resolve_augment(augment, **changes), normalize, decode == "device")


def random_resized_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng=np.random
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), torchvision's algorithm: up to ten draws of an
    area share in ``scale`` and a log-uniform aspect ratio in ``ratio`` until one fits, at a uniform
    position; else the largest central crop whose ratio is in range. The numbers come from numpy's
    generator (seeded per sample like the others): torchvision draws each from a tensor op, which costs
    a tenth of a millisecond per image, as much as the resize."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.randint(0, height - h + 1)), int(rng.randint(0, width - w + 1)), h, w
    shape = width / height
    if shape < min(ratio):
        w, h = width, round(width / min(ratio))
    elif shape > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """An opened, not yet decoded image -> its training crop: uint8 [3, S, S] (or float, normalised).

    The steps and their distributions are torchvision's: RandomResizedCrop(scale, ratio) or, with
    preset none, a square resize -> [horizontal flip] -> [colour jitter] -> [grayscale] ->
    [RandAugment]. `randaugment` is a timm config string ("rand-m7-n2": magnitude 7, two ops) or
    false; unless the string picks a timm op set itself (a "-t..." section), the ops are
    `LILT_RANDAUGMENT_OPS`.

    What makes it fast: the crop is drawn from the image's header size before any pixel is decoded
    (from numpy's generator), so a JPEG whose crop is at least twice the output on both sides at 1/2,
    1/4 or 1/8 scale decodes at that scale (DCT scaling), and others decode straight into a tensor and
    are resized as uint8 by torch's vectorised antialiased kernel. Both kernels are PIL's antialiased
    filters, so the pixels differ from a full decode and PIL resize by rounding only. Pixels stay uint8:
    a quarter of float32's bytes through the collate and the copy to the device, normalised there."""

    decodes = True  # takes an opened image and decodes it itself (lilt_ds.data.sample_rng.augmented)

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        aug: AugmentSettings,
        normalize: bool = False,
        on_device: bool = False,
    ):
        self.size, self.aug = image_size, aug
        self.interpolation = INTERPOLATIONS[aug.interpolation]
        # the crop step's parameters (it is not called: __call__ draws with random_resized_box and decodes for it)
        self.crop = (
            T.Resize((image_size, image_size), interpolation=self.interpolation)
            if aug.scale is None and aug.ratio is None
            else T.RandomResizedCrop(
                image_size,
                scale=aug.scale or (0.08, 1.0),
                ratio=aug.ratio or (3 / 4, 4 / 3),
                interpolation=self.interpolation,
            )
        )
        after = []
        if aug.hflip:
            after.append(T.RandomHorizontalFlip())
        if any(aug.color_jitter):
            brightness, contrast, saturation, hue = aug.color_jitter
            after.append(T.ColorJitter(brightness, contrast, saturation, hue))
        if aug.grayscale > 0:
            after.append(T.RandomGrayscale(aug.grayscale))
        self.on_pil = bool(aug.randaugment)  # timm's RandAugment takes PIL images; torchvision's steps take both
        if aug.randaugment:
            after.append(_randaugment(aug.randaugment, mean))
        self.after = T.Compose(after) if after else None
        self.normalized = ToNormalizedTensor(mean, std)
        self.normalize = normalize
        self.on_device = on_device  # data.decode=device: JPEGs leave as EncodedCrops (crop and flip drawn)

    @property
    def transforms(self) -> list:
        """The steps in order, as torchvision objects (their parameters), ending in the normalisation."""
        return [self.crop, *(self.after.transforms if self.after else []), self.normalized]

    def box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """The crop (top, left, height, width) of an opened image (its header size): a random draw
        (random_resized_box), or the whole image (preset none)."""
        if isinstance(self.crop, T.Resize):
            return 0, 0, image.height, image.width
        return random_resized_box(image.width, image.height, self.crop.scale, self.crop.ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor | EncodedCrop:
        box = self.box(image)
        if self.on_device and image.format == "JPEG" and not self.normalize:
            flip = self.aug.hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
            return EncodedCrop(encoded_bytes(image), box, flip, self.size, self.aug.interpolation)
        pixels = self.augment(self.resized_crop(image, *box))
        return self.normalized.tensor(pixels) if self.normalize else pixels.contiguous()

    def resized_crop(self, image: Image.Image, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The box of an opened image decoded and resized to uint8 [3, S, S], at the least decoding work.

        A JPEG whose crop is at least 2S on both sides at 1/r scale decodes at 1/r and PIL resizes the
        box's exact (fractional) bounds there: rounded to whole reduced pixels it would be up to a
        quarter of an output pixel off, which costs detailed photos 10-20 dB of PSNR. Other JPEGs
        decode straight into a tensor (torchvision) and other formats through PIL, and torch's
        vectorised antialiased kernel resizes the box."""
        if isinstance(self.crop, T.Resize):  # preset none: exactly the evaluation transform's pixels
            return _chw(load_rgb(image).resize((self.size, self.size), pil_modes_mapping[self.interpolation]))
        full_width, full_height = image.size
        reduction = largest_reduction(width, height, self.size)
        if reduction == 1 and image.format == "JPEG" and image.fp is not None:
            pixels = decode_jpeg_rgb(image)
        else:
            image = load_rgb(image, reduction)
            if image.size != (full_width, full_height):
                sx, sy = image.width / full_width, image.height / full_height
                box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
                return _chw(image.resize((self.size, self.size), pil_modes_mapping[self.interpolation], box=box))
            pixels = _chw(image)
        return F2.resized_crop(pixels, top, left, height, width, [self.size] * 2, self.interpolation, antialias=True)

    def augment(self, pixels: torch.Tensor) -> torch.Tensor:
        """The steps after the crop (flip, jitter, grayscale, RandAugment) on uint8 [3, S, S]."""
        if self.after is None:
            return pixels
        if not self.on_pil:
            return self.after(pixels)
        return _chw(self.after(Image.fromarray(pixels.permute(1, 2, 0).numpy())).convert("RGB"))

    def with_normalize(self) -> TrainTransform:
        """This transform with float output, normalised in the worker (the feature cache's views)."""
        out = copy.copy(self)
        out.normalize = True
        return out

    def __repr__(self) -> str:
        where = "in the worker" if self.normalize else "on the device"
        return f"TrainTransform(size={self.size}, augment={dataclasses.asdict(self.aug)}, {self.normalized!r} {where})"


def _chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a writable uint8 [3, H, W] tensor (a view of one copy of its pixels)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], preprocess: dict | None = None):
    """The evaluation transform: the original square resize (bicubic) -> ToTensor + Normalize(mean, std),
    or, with ``preprocess`` (a tower's ``eval_preprocess``, picked by ``eval_preprocess_of``), its
    source's own (OpenCLIP's, the Hugging Face image processor's, timm's)."""
    _check_size(image_size)
    if preprocess is not None:
        return source_eval_transform(preprocess, image_size, mean, std)
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

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> normalised float32 [3, H, W], the same arithmetic as for an image."""
        return torch.from_numpy(
            pixels.numpy().astype(np.float32) * self.scale[:, None, None] - self.shift[:, None, None]
        )

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={list(self.shift / self.scale / 255)}, std={list(1 / self.scale / 255)})"


def normalize_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype) -> torch.Tensor:
    """A uint8 batch [B, 3, H, W] (already on its device) -> normalised ``dtype``, computed in float32
    as ToNormalizedTensor does (the same values); a float batch passes through in ``dtype``."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    std_ = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    scale = 1.0 / (255.0 * std_)
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None] / std_
    return (images.float() * scale - shift).to(dtype)


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image size {image_size!r}: expected a positive number of pixels.")
