"""Building the training loader and the evaluation data from the `data` section of the config."""

import functools
import os
from typing import Dict, Optional, Sequence, Tuple

from torch.utils.data import DataLoader

from .caption_dataset import CaptionDataset
from .captions import load_caption_files
from .collate import ImageTextCollator
from .config import resolve_data_config
from .demo import ensure_demo_data
from .errors import DataError
from .retrieval import RetrievalData, build_retrieval_data
from .sampler import ResumableDistributedSampler
from .text import pre_caption
from .transforms import build_train_transform


class TrainLoader:
    """The training DataLoader plus the bookkeeping that has to happen in the training process:
    each delivered batch advances the sampler's position (so `sampler.state_dict()` is exact
    although workers prefetch ahead) and its skipped entries are recorded in
    `dataset.bad_samples` (workers hold copies of the dataset). Batches are
    `{"images", "input_ids", "attention_mask", "index"}`."""

    def __init__(self, loader: DataLoader, dataset: CaptionDataset, sampler: ResumableDistributedSampler):
        self.loader = loader
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = loader.batch_size

    def __iter__(self):
        for batch in self.loader:
            for bad in batch.pop("bad_samples"):
                self.dataset.bad_samples.record(bad)
            self.sampler.advance(len(batch["index"]))
            yield batch
        self.sampler.finish_epoch()

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.loader)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def build_train_loader(data_cfg: Dict, tokenizer, image_size: int, mean: Sequence[float],
                       std: Sequence[float], rank: int, world_size: int, micro_batch_size: int,
                       seed: int) -> Tuple[TrainLoader, CaptionDataset, ResumableDistributedSampler]:
    """Everything for training from the `data` config section (see `DATA_DEFAULTS`); empty
    `train_files` trains on the built-in demo dataset (generated on first use)."""
    cfg = resolve_data_config(data_cfg)
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise DataError(f"micro batch size {micro_batch_size!r}: expected a positive integer.")
    files, image_root = cfg["train_files"], cfg["image_root"]
    if not files:
        files, image_root = [_demo(cfg)["train"]], None
    clean = functools.partial(pre_caption, max_words=cfg["max_words"]) if cfg["clean_captions"] else None
    table = load_caption_files(files, image_root, clean)
    transform = build_train_transform(image_size, mean, std, hflip=cfg["hflip"],
                                      randaugment=cfg["randaugment"])
    dataset = CaptionDataset(table, transform, seed=seed, on_bad_sample=cfg["on_bad_sample"],
                             max_bad_fraction=cfg["max_bad_fraction"])
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, seed=seed)
    if sampler.num_samples < micro_batch_size:
        raise DataError(f"each of the {world_size} ranks gets {sampler.num_samples} of the "
                        f"{len(dataset)} training samples per epoch, fewer than the micro batch "
                        f"size {micro_batch_size}: no full batch. Add data or lower the batch size.")
    workers = cfg["num_workers"]
    if workers > 0:
        # Fast tokenizers used before the fork warn and disable themselves in workers anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=cfg["pin_memory"],
                        persistent_workers=cfg["persistent_workers"] and workers > 0,
                        drop_last=True, collate_fn=ImageTextCollator(tokenizer, cfg["max_length"]))
    return TrainLoader(loader, dataset, sampler), dataset, sampler


def build_eval_data(data_cfg: Dict, tokenizer, image_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> Optional[RetrievalData]:
    """The retrieval evaluation data: `eval_file`, else the demo's eval split when training on the
    demo, else None (no evaluation data configured)."""
    cfg = resolve_data_config(data_cfg)
    if cfg["eval_file"] is not None:
        path, image_root = cfg["eval_file"], cfg["eval_image_root"]
    elif not cfg["train_files"]:
        demo = _demo(cfg)
        path, image_root = demo["eval"], demo["image_root"]
    else:
        return None
    return build_retrieval_data(path, image_root, tokenizer, image_size, mean, std,
                                max_length=cfg["eval_max_length"],
                                clean_captions=cfg["clean_captions"], max_words=cfg["max_words"])


def _demo(cfg: Dict) -> Dict[str, str]:
    demo = cfg["demo"]
    return ensure_demo_data(n=demo["n"], seed=demo["seed"], eval_n=demo["eval_n"], size=demo["size"])
