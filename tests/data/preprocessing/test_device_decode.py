"""data.decode=device (lilt_ds/data/preprocessing/device_decode.py): JPEGs leave the workers encoded with
their crop drawn and decode batched in the training process. The code runs here on the CPU device (the
same calls as on a GPU); the key itself is refused where there is no CUDA."""

import numpy as np
import pytest
import torch
from PIL import Image

from lilt_ds.data import DataError, build_train_loader, resolve_data_config
from lilt_ds.data.preprocessing.device_decode import decode_on_device
from lilt_ds.train import to_device

from ..files import MEAN, STD, write_json, write_photos


def loader(tokenizer, files, decode, batch=4):
    data = {
        "train_files": files,
        "decode": decode,
        "augment": {"preset": "openclip", "hflip": True},
        "num_workers": 1,
        "persistent_workers": False,
        "clean_captions": False,
    }
    return build_train_loader(data, tokenizer, 96, MEAN, STD, 0, 1, batch, seed=5)


def test_device_decoding_gives_the_cpu_paths_crops_and_flips(tmp_path, tokenizer):
    """The same draws (crop box and flip) either way; pixels within the resize's rounding of the CPU
    path, which decodes these photos at a reduced scale where the crop allows."""
    photos = write_photos(tmp_path / "photos")
    png = str(tmp_path / "photos" / "noise.png")  # not a JPEG: decoded in the worker either way
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 120, 3), dtype=np.uint8)).save(png)
    entries = [{"image": p, "caption": f"photo {i}"} for i, p in enumerate(photos + [png, photos[0]])]
    files = [write_json(tmp_path / "train.json", entries)]
    cpu, device = (next(iter(loader(tokenizer, files, decode, batch=8))) for decode in ("cpu", "device"))
    assert "encoded_images" not in cpu and cpu["index"].tolist() == device["index"].tolist()
    encoded = device["encoded_images"]
    png_slot = device["index"].tolist().index(6)
    assert png_slot not in encoded["slots"].tolist() and len(encoded["slots"]) == 7
    assert torch.equal(device["images"][png_slot], cpu["images"][png_slot])
    assert encoded["flips"].any() and not encoded["flips"].all()  # both draws occur among 7
    ours = to_device(device, torch.device("cpu"), torch.float32, MEAN, STD)["images"]
    reference = to_device(cpu, torch.device("cpu"), torch.float32, MEAN, STD)["images"]

    def psnr(a, b):
        levels = ((a - b) * torch.tensor(STD)[:, None, None] * 255).numpy()
        return 10 * np.log10(255**2 / max(np.mean(levels**2), 1e-12))

    for slot in range(8):  # the DCT scaling of the CPU path costs a few dB; a missed flip costs far more
        assert psnr(ours[slot], reference[slot]) > max(30, psnr(ours[slot], reference[slot].flip(-1)) + 8), slot


def test_a_jpeg_that_does_not_decode_on_the_device_names_its_entry(tmp_path, tokenizer):
    photo = write_photos(tmp_path, ["chelsea"])[0]
    good = open(photo, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])  # the header reads, the pixels stop short
    entries = [{"image": photo, "caption": "cat"}] * 3 + [{"image": str(tmp_path / "cut.jpg"), "caption": "cut"}]
    batch = next(iter(loader(tokenizer, [write_json(tmp_path / "t.json", entries)], "device")))
    with pytest.raises(DataError, match=r"training entry 3: its JPEG does not decode .* Set data.decode=cpu"):
        decode_on_device(batch["images"], batch["encoded_images"], batch["index"])


@pytest.mark.parametrize(
    "augment, named",
    [
        ({"preset": "lilt"}, r"data\.augment\.randaugment = 'rand-m7-n2'"),
        ({"preset": "openclip", "color_jitter": 0.4}, r"data\.augment\.color_jitter = \[0\.4, 0\.4, 0\.4, 0\.0\]"),
        ({"preset": "openclip", "grayscale": 0.1}, r"data\.augment\.grayscale = 0\.1"),
    ],
)
def test_device_decoding_refuses_augmentations_that_need_pil_at_config_load(augment, named):
    with pytest.raises(
        DataError, match=r"data\.decode = device decodes, crops and flips on the GPU only, and " + named
    ):
        resolve_data_config({"decode": "device", "augment": augment})
    assert (
        resolve_data_config({"decode": "device", "augment": {"preset": "openclip", "hflip": True}}).decode == "device"
    )
