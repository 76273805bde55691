"""Image transforms of the original LilT recipe, with the vision tower's mean/std passed in."""

import re
from typing import Optional, Sequence

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T

from ..errors import DataError

_RANDAUGMENT_SECTION = re.compile(r"(m|n|mmax|inc)\d+|(p|mstd)\d+(\.\d*)?|t[a-z0-9]+")

# The original LilT RandomAugment op set (timm names). It leaves hues alone: colour words in
# captions stay true, which timm's default set (Invert, Solarize, Color, ...) would break.
LILT_RANDAUGMENT_OPS = ["AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                        "TranslateXRel", "TranslateYRel", "Rotate"]


def build_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                          hflip: bool = True, randaugment: Optional[str] = "rand-m7-n2"):
    """RandomResizedCrop(scale 0.2-1, bicubic) -> [horizontal flip] -> [RandAugment] ->
    ToTensor + Normalize(mean, std).

    `randaugment` is a timm config string ("rand-m7-n2": magnitude 7, two ops) or None. Unless the
    string picks a timm op set itself (a "-t..." section), the ops are `LILT_RANDAUGMENT_OPS`."""
    _check_size(image_size)
    steps = [T.RandomResizedCrop(image_size, scale=(0.2, 1.0),
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment:
        steps.append(_randaugment(randaugment, mean))
    steps.append(ToNormalizedTensor(mean, std))
    return T.Compose(steps)


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize to image_size x image_size (bicubic) -> ToTensor + Normalize(mean, std)."""
    _check_size(image_size)
    return T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
                      ToNormalizedTensor(mean, std)])


def _randaugment(config: str, mean: Sequence[float]):
    fix = ('use a timm RandAugment string such as "rand-m7-n2" (m: magnitude 0-10, n: ops per '
           "image), or null to disable")
    parts = config.split("-") if isinstance(config, str) else []
    if not parts or parts[0] != "rand" or not all(_RANDAUGMENT_SECTION.fullmatch(p) for p in parts[1:]):
        raise DataError(f"data.randaugment = {config!r} is not a RandAugment string; {fix}.")
    picks_op_set = any(part.startswith("t") for part in parts[1:])
    hparams = {"translate_pct": 0.45, "img_mean": tuple(int(round(255 * m)) for m in mean)}
    try:
        return rand_augment_transform(config, hparams,
                                      transforms=None if picks_op_set else LILT_RANDAUGMENT_OPS)
    except (AssertionError, ValueError, KeyError) as err:
        raise DataError(f"data.randaugment = {config!r} does not parse ({err or 'bad section'}); "
                        f"{fix}.") from None


class ToNormalizedTensor:
    """ToTensor followed by Normalize(mean, std), computed in numpy: single-threaded, so it does
    not go through torch's intra-op thread pool, which on a busy machine makes such small ops
    many times slower in the main process (num_workers=0)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise DataError(f"image mean {list(mean)} / std {list(std)}: expected three values each "
                            "(RGB) and a positive std; take them from the vision tower's config.")
        self.scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32)))
        self.shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32))

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
