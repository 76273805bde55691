"""Train and eval image transforms (lilt_ds/data/preprocessing/transforms.py)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lilt_ds.data import DataError, build_eval_transform, build_train_transform, normalize_pixels
from lilt_ds.data.preprocessing.images import UndecodableImage
from lilt_ds.data.preprocessing.transforms import ToNormalizedTensor, random_resized_box
from lilt_ds.errors import LiltError

from ..files import MEAN, STD


def test_train_transform_gives_uint8_pixels_that_the_device_normalises_as_the_worker_would():
    image = Image.new("RGB", (80, 60), (255, 0, 0))
    torch.manual_seed(0)
    pixels = build_train_transform(48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), randaugment=False)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 48)
    assert pixels[:, 10, 10].tolist() == [255, 0, 0]
    batch = torch.stack([pixels, 255 - pixels])
    on_device = normalize_pixels(batch, MEAN, STD, torch.float32)
    in_worker = torch.stack([ToNormalizedTensor(MEAN, STD).tensor(p) for p in batch])
    assert torch.equal(on_device, in_worker)  # bit for bit: the same float32 arithmetic
    reference = T.Normalize(MEAN, STD)(batch.float() / 255)
    assert torch.allclose(on_device, reference, atol=1e-5)
    assert normalize_pixels(on_device, MEAN, STD, torch.bfloat16).dtype == torch.bfloat16  # float passes through


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.mark.parametrize(
    "photo, size, least_psnr",
    [
        ("coffee", 224, 60),  # 600 x 400: the crop is under 2 x 224, a full decode
        ("astronaut", 112, 40),  # 512 x 512: decoded at 1/2
        ("retina", 224, 40),  # 1411 x 1411: at 1/2
        ("retina", 112, 40),  # at 1/4
    ],
)
def test_the_fast_crop_differs_from_a_full_decode_and_resize_of_its_box_only_by_rounding(photo, size, least_psnr):
    """Real photos as JPEG: the pixels of the drawn box equal those of a full decode and torchvision's
    resized_crop on the PIL image (PIL's bicubic) but for the resize's and the DCT scaling's rounding;
    the box one output pixel off is far below."""
    import skimage.data
    from torchvision.transforms import functional as F

    data = jpeg(getattr(skimage.data, photo)())
    full = Image.open(io.BytesIO(data)).convert("RGB")
    fast = build_train_transform(size, MEAN, STD, {"preset": "openclip"})
    worst, wrong = float("inf"), 0.0
    for seed in range(8):
        np.random.seed(seed)
        box = fast.box(Image.open(io.BytesIO(data)))
        np.random.seed(seed)
        ours = fast(Image.open(io.BytesIO(data))).permute(1, 2, 0).numpy()
        reference = np.asarray(F.resized_crop(full, *box, [size, size], T.InterpolationMode.BICUBIC))
        worst = min(worst, psnr(ours, reference))
        top, left, height, width = box
        step = round(width / size)  # the box one output pixel up and left
        shifted = (max(top - step, 0), max(left - step, 0), height, width)
        other = F.resized_crop(full, *shifted, [size, size], T.InterpolationMode.BICUBIC)
        wrong = max(wrong, psnr(ours, np.asarray(other)))
    assert worst >= least_psnr and worst > wrong + 8, (worst, wrong)


@pytest.mark.parametrize(
    "width, height, scale, ratio",
    [
        (400, 300, (0.9, 1.0), (3 / 4, 4 / 3)),
        (300, 500, (0.2, 1.0), (3 / 4, 4 / 3)),
        (819, 512, (0.9, 1.0), (3 / 4, 4 / 3)),
    ],
)
def test_the_crop_boxes_follow_torchvisions_random_resized_crop_distribution(width, height, scale, ratio):
    """2,000 boxes drawn each way: area, aspect, position (including torchvision's central fallback when
    no draw fits, the common case for a wide image and scale 0.9) have the same distributions
    (two-sample Kolmogorov-Smirnov); a box of another scale range is told apart."""
    from scipy.stats import ks_2samp

    image = Image.new("RGB", (width, height))

    def features(boxes):
        b = np.array(boxes, dtype=np.float64)
        top, left, h, w = b.T
        return {"area": h * w, "aspect": w / h, "top": top, "left": left}

    np.random.seed(0)
    ours = features([random_resized_box(width, height, scale, ratio) for _ in range(2000)])
    torch.manual_seed(0)
    theirs = features([T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(2000)])
    other = features([random_resized_box(width, height, (scale[0] * 0.8, scale[1]), ratio) for _ in range(2000)])
    for name in ours:
        if np.ptp(ours[name]) == 0 and np.ptp(theirs[name]) == 0:
            assert ours[name][0] == theirs[name][0], name  # a constant (the fallback box): the same one
            continue
        assert ks_2samp(ours[name], theirs[name]).pvalue > 1e-3, name
    assert ks_2samp(ours["area"], other["area"]).pvalue < 1e-6


def test_a_corrupt_jpeg_raises_undecodable_image_at_every_scale():
    import skimage.data

    data = jpeg(skimage.data.astronaut())[:5000]
    for size in (224, 64):
        with pytest.raises(
            UndecodableImage, match="image file is truncated|JPEG decoding: Image is incomplete or truncated"
        ):
            build_train_transform(size, MEAN, STD, {"preset": "openclip"})(Image.open(io.BytesIO(data)))


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
    evaluation = build_eval_transform(32, MEAN, STD)(image)
    assert torch.equal(normalize_pixels(train[None], MEAN, STD, torch.float32)[0], evaluation)


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
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    torch.manual_seed(0)
    jittered = build_train_transform(
        32, (0.5,) * 3, (0.5,) * 3, {"preset": "none", "color_jitter": 0.8}, normalize=True
    )(image)
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
