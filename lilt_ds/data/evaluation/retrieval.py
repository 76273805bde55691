"""Image-text retrieval evaluation data in the original LilT format.

The file holds a list of `{"image": "relative/path.jpg", "caption": ["...", ...]}` with an image
root. Every caption of an image is a correct match for it: `img2txt[i]` lists the text indices of
image i, `txt2img[t]` is the image of text t. Missing images are an error, never skipped:
recall over a different set of images would not be comparable between runs.
"""

import functools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, format_list
from ..index.captions import CaptionTable, load_caption_files
from ..preprocessing.collate import stack_images
from ..preprocessing.images import open_rgb
from ..preprocessing.text import check_tokenizer, pre_caption, tokenize_captions
from ..preprocessing.transforms import build_eval_transform


class RetrievalImages(Dataset):
    """`images[i]` -> `{"image": FloatTensor[3,H,W], "index": i}` with the eval transform."""

    def __init__(self, table: CaptionTable, transform):
        self.table = table
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        try:
            image = open_rgb(self.table.image_path(index))
        except Exception as err:  # any decoding failure of a user's file is bad data
            bad = self.table.bad_sample(index, f"cannot decode: {type(err).__name__}: {err}")
            raise DataError(
                f"{bad.describe()}. Replace the file or remove the entry from the evaluation JSON."
            ) from err
        return {"image": self.transform(image), "index": index}


def collate_images(samples: list[dict]) -> dict[str, torch.Tensor]:
    """`{"images": FloatTensor[B,3,H,W], "index": LongTensor[B]}`."""
    return {
        "images": stack_images([s["image"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


class RetrievalData:
    """The evaluation images (`images`, a Dataset), the flat list of (cleaned) captions (`texts`)
    and the ground truth maps `img2txt` (image -> list of text indices) and `txt2img`."""

    def __init__(
        self,
        images: RetrievalImages,
        texts: list[str],
        img2txt: list[list[int]],
        txt2img: list[int],
        tokenizer,
        max_length: int,
    ):
        self.images = images
        self.texts = texts
        self.img2txt = img2txt
        self.txt2img = txt2img
        self.tokenizer = tokenizer
        self.max_length = max_length

    def image_loader(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
        """All images in order, in batches of `collate_images`."""
        return DataLoader(
            self.images,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=collate_images,
        )

    def text_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """All texts in order: `{"input_ids", "attention_mask", "index"}` per batch."""
        for start in range(0, len(self.texts), batch_size):
            chunk = self.texts[start : start + batch_size]
            batch = tokenize_captions(self.tokenizer, chunk, self.max_length)
            batch["index"] = torch.arange(start, start + len(chunk), dtype=torch.long)
            yield batch


def build_retrieval_data(
    path: str,
    image_root,
    tokenizer,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_length: int = 30,
    clean_captions: bool = True,
    max_words: int = 30,
    index_cache: str | None = "auto",
    preprocess: dict | None = None,
) -> RetrievalData:
    """Read and validate a retrieval JSON; `image_root` takes the forms of `ImageRoot`,
    `index_cache` those of `load_caption_files`' `cache`, `preprocess` those of build_eval_transform's."""
    check_tokenizer(tokenizer)
    clean = functools.partial(pre_caption, max_words=max_words) if clean_captions else None
    table = load_caption_files(
        [path], image_root, clean, setting="data.eval_file", root_setting="data.eval_image_root", cache=index_cache
    )
    missing = table.missing_images()
    if missing:
        raise DataError(
            f"{len(missing)} of {len(table)} evaluation images are missing:\n"
            f"{format_list([s.describe() for s in missing])}\n"
            "Fix data.eval_image_root or the paths in the file."
        )
    texts, img2txt, txt2img = [], [], []
    for image in range(len(table)):
        img2txt.append(list(range(len(texts), len(texts) + table.num_captions(image))))
        for choice in range(table.num_captions(image)):
            texts.append(table.caption(image, choice))
            txt2img.append(image)
    images = RetrievalImages(table, build_eval_transform(image_size, mean, std, preprocess))
    return RetrievalData(images, texts, img2txt, txt2img, tokenizer, max_length)
