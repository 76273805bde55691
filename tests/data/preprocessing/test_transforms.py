"""Train and eval image transforms (lilt_ds/data/preprocessing/transforms.py)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lilt_ds.data import DataError, build_eval_transform, build_train_transform
from lilt_ds.data.preprocessing.transforms import ToNormalizedTensor

from ..files import MEAN, STD


def test_train_transform_shape_and_normalisation():
    image = Image.new("RGB", (80, 60), (255, 0, 0))
    torch.manual_seed(0)
    out = build_train_transform(48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), randaugment=None)(image)
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


@pytest.mark.parametrize("kwargs, message", [
    ({"randaugment": "auto-m7"}, r"data\.randaugment = 'auto-m7' is not a RandAugment string"),
    ({"std": (0.5, 0.0, 0.5)}, r"expected three values each \(RGB\) and a positive std"),
    ({"mean": (0.5,)}, r"expected three values each"),
    ({"image_size": 0}, r"image size 0: expected a positive number"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    args = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(DataError, match=message):
        build_train_transform(**args)
