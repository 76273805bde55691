"""Train and eval image transforms (lilt_ds/data/preprocessing/transforms.py)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lilt_ds.data import DataError, build_eval_transform, build_train_transform
from lilt_ds.data.preprocessing.transforms import ToNormalizedTensor
from lilt_ds.errors import LiltError

from ..files import MEAN, STD


def test_train_transform_shape_and_normalisation():
    image = Image.new("RGB", (80, 60), (255, 0, 0))
    torch.manual_seed(0)
    out = build_train_transform(48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), randaugment=False)(image)
    assert out.shape == (3, 48, 48)
    assert torch.allclose(out[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)


def test_to_normalized_tensor_equals_torchvision_to_tensor_and_normalize():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    reference = T.Normalize(MEAN, STD)(T.ToTensor()(image))
    ours = ToNormalizedTensor(MEAN, STD)(image)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.allclose(ours, reference, atol=1e-5)


def test_randaugment_uses_the_original_op_set_unless_the_string_picks_one():
    def ops(config):
        augment = build_train_transform(32, (0.5,) * 3, (0.5,) * 3, randaugment=config).transforms[2]
        return augment.num_layers, {op.name for op in augment.ops}, augment.ops[0].magnitude

    layers, names, magnitude = ops("rand-m7-n2")
    assert (layers, magnitude) == (2, 7) and "Invert" not in names and "Rotate" in names
    assert "Invert" in ops("rand-m9-n3-tweights")[1]


def test_hflip_can_be_disabled():
    names = [type(t).__name__ for t in build_train_transform(32, (0.5,) * 3, (0.5,) * 3, hflip=False).transforms]
    assert "RandomHorizontalFlip" not in names and "RandAugment" in names


def test_eval_transform_resizes_to_a_square():
    out = build_eval_transform(40, (0.5,) * 3, (0.25,) * 3)(Image.new("RGB", (100, 30), (128, 128, 128)))
    assert out.shape == (3, 40, 40)
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"randaugment": "auto-m7"}, r"data\.augment\.randaugment = 'auto-m7' is not a RandAugment string"),
        ({"std": (0.5, 0.0, 0.5)}, r"expected three values each \(RGB\) and a positive std"),
        ({"mean": (0.5,)}, r"expected three values each"),
        ({"image_size": 0}, r"image size 0: expected a positive number"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    args = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(DataError, match=message):
        build_train_transform(**args)


def steps(augment=None, **changes):
    return build_train_transform(32, (0.5,) * 3, (0.5,) * 3, augment, **changes).transforms


def test_each_preset_builds_its_recipe():
    lilt = steps()
    assert [type(t).__name__ for t in lilt] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandAugment",
        "ToNormalizedTensor",
    ]
    assert lilt[0].scale == [0.2, 1.0] and lilt[0].interpolation == T.InterpolationMode.BICUBIC
    openclip = steps({"preset": "openclip"})
    assert [type(t).__name__ for t in openclip] == ["RandomResizedCrop", "ToNormalizedTensor"]
    assert openclip[0].scale == [0.9, 1.0] and openclip[0].ratio == [0.75, 4 / 3]
    assert [type(t).__name__ for t in steps({"preset": "none"})] == ["Resize", "ToNormalizedTensor"]


def test_preset_none_trains_on_what_evaluation_sees():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    train = build_train_transform(32, MEAN, STD, {"preset": "none"})(image)
    assert torch.equal(train, build_eval_transform(32, MEAN, STD)(image))


def test_every_augmentation_parameter_reaches_the_transform():
    crop, flip, jitter, grey, augment, _ = steps(
        {
            "preset": "openclip",
            "scale": [0.5, 0.8],
            "ratio": [0.9, 1.1],
            "interpolation": "bilinear",
            "hflip": True,
            "randaugment": "rand-m3-n1",
            "color_jitter": [0.4, 0.3, 0.2, 0.1],
            "grayscale": 0.2,
        }
    )
    assert crop.scale == [0.5, 0.8] and crop.ratio == [0.9, 1.1]
    assert crop.interpolation == T.InterpolationMode.BILINEAR and isinstance(flip, T.RandomHorizontalFlip)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.7, 1.3),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    assert grey.p == 0.2 and (augment.num_layers, augment.ops[0].magnitude) == (1, 3)
    assert steps(color_jitter=0.4)[2].hue is None  # one strength: brightness, contrast, saturation


def test_a_colour_changed_image_differs_and_a_grey_one_has_equal_channels():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    grey = build_train_transform(32, (0.5,) * 3, (0.5,) * 3, {"preset": "none", "grayscale": 1.0})(image)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)
    torch.manual_seed(0)
    jittered = build_train_transform(32, (0.5,) * 3, (0.5,) * 3, {"preset": "none", "color_jitter": 0.8})(image)
    assert not torch.allclose(jittered, build_eval_transform(32, (0.5,) * 3, (0.5,) * 3)(image), atol=0.05)


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"preset": "flip"}, r"data\.augment\.preset = 'flip': expected one of lilt, openclip, none"),
        ({"scale": [0.9, 0.2]}, r"data\.augment\.scale = \[0\.9, 0\.2\]: expected \[low, high\] with 0 < low <= high"),
        (
            {"scale": [0.5, 1.5]},
            r"data\.augment\.scale = \[0\.5, 1\.5\]: the crop's share of the image area is at most 1",
        ),
        ({"preset": "none", "scale": [0.5, 1.0]}, r"data\.augment\.scale = \[0\.5, 1\.0\]: preset none does not crop"),
        ({"interpolation": "lanczos"}, r"data\.augment\.interpolation = 'lanczos': expected one of bicubic"),
        ({"color_jitter": [0.1, 0.1, 0.1, 0.9]}, r"data\.augment\.color_jitter = .*hue <= 0\.5"),
        ({"grayscale": 1.5}, r"data\.augment\.grayscale = 1\.5: expected a number >= 0 and <= 1"),
        ({"randaugment": True}, r"data\.augment\.randaugment = True: expected a timm RandAugment string"),
        ({"crop": 1}, r"unknown config key 'data\.augment\.crop'"),
    ],
)
def test_bad_augmentation_is_refused_naming_the_key(augment, message):
    with pytest.raises(LiltError, match=message):
        steps(augment)
