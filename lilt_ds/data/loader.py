"""Building the training loader and the evaluation data from the `data` section of the config.

Training reads either caption JSON files (`data.train_files`, a map-style CaptionDataset under a
ResumableDistributedSampler) or tar shards (`data.train_shards`, a ShardDataset that batches in
its workers and whose sampler is its ShardProgress); both give the same batches and the same
TrainLoader interface."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Mapping, Sequence

from torch.utils.data import DataLoader, get_worker_info

from ..schema import DataSettings
from .caption_dataset import CaptionDataset
from .config import loader_settings, resolve_data_config
from .demo import ensure_demo_data
from .errors import DataError
from .evaluation.retrieval import RetrievalData, build_retrieval_data
from .index.captions import load_caption_files
from .preprocessing.collate import ImageTextCollator
from .preprocessing.text import pre_caption
from .preprocessing.transforms import build_train_transform
from .sampler import ResumableDistributedSampler
from .shards.dataset import ShardDataset
from .shards.files import find_shards
from .shards.progress import ShardProgress
from .shards.stream import ResampledShardDataset, StreamProgress

Sampler = ResumableDistributedSampler | ShardProgress | StreamProgress


class TrainLoader:
    """The training DataLoader plus the bookkeeping that has to happen in the training process:
    each delivered batch advances the sampler's position (so `sampler.state_dict()` is exact
    although workers prefetch ahead) and its skipped entries are recorded in
    `dataset.bad_samples` (workers hold copies of the dataset). Batches are
    `{"images", "input_ids", "attention_mask", "index"}`."""

    def __init__(
        self,
        loader: DataLoader,
        dataset: CaptionDataset | ShardDataset,
        sampler: Sampler,
        batch_size: int | None = None,
    ):
        self.loader = loader
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size or loader.batch_size

    def __iter__(self):
        self.sampler.start_pass()
        for batch in self.loader:
            for bad in batch.pop("bad_samples"):
                self.dataset.bad_samples.record(bad)
            self.sampler.record_batch(batch)
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


def build_train_loader(
    data_cfg: DataSettings | Mapping,
    tokenizer,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    device_type: str = "cpu",
) -> TrainLoader:
    """Everything for training from the `data` config section (`lilt_ds.schema.DataSettings`): tar shards
    when `train_shards` is set, else the `train_files`; neither trains on the built-in demo
    dataset (generated on first use). ``device_type`` decides the "auto" workers and pinning."""
    cfg = resolve_data_config(data_cfg)
    workers, pin_memory = loader_settings(cfg, device_type)
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise DataError(f"micro batch size {micro_batch_size!r}: expected a positive integer.")
    transform = build_train_transform(image_size, mean, std, cfg.augment, decode=cfg.decode)
    collate = ImageTextCollator(tokenizer, cfg.max_length)
    if workers > 0:
        # Fast tokenizers used before the fork warn and disable themselves in workers anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader_args = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": cfg.persistent_workers and workers > 0,
        "worker_init_fn": start_worker,
    }
    build = _shard_loader if cfg.train_shards is not None else _json_loader
    loader, dataset, sampler, size = build(
        cfg, transform, collate, micro_batch_size, rank, world_size, seed, loader_args
    )
    if sampler.num_samples < micro_batch_size:
        raise DataError(
            f"each of the {world_size} ranks gets {sampler.num_samples} of the "
            f"{size} training samples per epoch, fewer than the micro batch "
            f"size {micro_batch_size}: no full batch. Add data or lower the batch size."
        )
    return TrainLoader(loader, dataset, sampler, micro_batch_size)


def _caption_cleaning(cfg):
    return functools.partial(pre_caption, max_words=cfg.max_words) if cfg.clean_captions else None


def _json_loader(cfg, transform, collate, batch_size, rank, world_size, seed, loader_args):
    files, image_root = cfg.train_files, cfg.image_root
    if not files:
        files, image_root = [_demo(cfg)["train"]], None
    table = load_caption_files(files, image_root, _caption_cleaning(cfg), cache=cfg.index_cache, table=cfg.table)
    table.make_resident()
    dataset = CaptionDataset(
        table, transform, seed=seed, on_bad_sample=cfg.on_bad_sample, max_bad_fraction=cfg.max_bad_fraction
    )
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, seed=seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate, **loader_args
    )
    return loader, dataset, sampler, len(dataset)


def _shard_loader(cfg, transform, collate, batch_size, rank, world_size, seed, loader_args):
    shards = find_shards(
        cfg.train_shards, cfg.samples_per_epoch, timeout_s=cfg.shard_timeout_s, resampled=cfg.resampled
    )
    workers = max(loader_args["num_workers"], 1)
    args = (transform, collate, batch_size, rank, world_size, seed)
    options = {
        "on_bad_sample": cfg.on_bad_sample,
        "max_bad_fraction": cfg.max_bad_fraction,
        "clean": _caption_cleaning(cfg),
        "shuffle_buffer": cfg.shuffle_buffer,
        "retries": cfg.shard_retries,
        "timeout_s": cfg.shard_timeout_s,
    }
    if cfg.resampled:
        dataset = ResampledShardDataset(shards, cfg.samples_per_epoch or shards.total, workers, *args, **options)
        loader = DataLoader(dataset, batch_size=None, **loader_args)  # the dataset batches
        return loader, dataset, dataset.progress, dataset.progress.samples_per_epoch
    if len(shards.paths) < world_size * workers:
        raise DataError(
            f"data.train_shards has {len(shards.paths)} shards, fewer than ranks x "
            f"DataLoader workers = {world_size} x {workers}: some would read the same "
            "shards. Write more, smaller shards (--shard-size) or lower data.num_workers."
        )
    dataset = ShardDataset(shards, *args, **options)
    loader = DataLoader(dataset, batch_size=None, **loader_args)  # the dataset batches
    return loader, dataset, dataset.progress, shards.total


def start_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn` that keeps a worker's memory flat through the epoch. A forked
    worker shares the training process's memory copy-on-write, but its garbage collector, on a
    full collection, writes into every object it inherited (about 100 MB of torch and
    transformers objects), copying the pages that hold them: freeze them. A cached caption index
    is mapped into the worker at once rather than page by page as samples reach it."""
    gc.freeze()
    dataset = get_worker_info().dataset
    if isinstance(dataset, CaptionDataset):
        dataset.table.make_resident()


def build_eval_data(
    data_cfg: DataSettings | Mapping,
    tokenizer,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    preprocess: dict | None = None,
) -> RetrievalData | None:
    """The retrieval evaluation data: `eval_file`, else the demo's eval split when training on the
    demo, else None (no evaluation data configured). ``preprocess``: see build_eval_transform."""
    cfg = resolve_data_config(data_cfg)
    if cfg.eval_file is not None:
        path, image_root = cfg.eval_file, cfg.eval_image_root
    elif trains_on_demo(cfg):
        demo = _demo(cfg)
        path, image_root = demo["eval"], demo["image_root"]
    else:
        return None
    return build_retrieval_data(
        path,
        image_root,
        tokenizer,
        image_size,
        mean,
        std,
        max_length=cfg.eval_max_length,
        clean_captions=cfg.clean_captions,
        max_words=cfg.max_words,
        index_cache=cfg.index_cache,
        preprocess=preprocess,
    )


def trains_on_demo(cfg: DataSettings) -> bool:
    """No training data is configured: the run trains on the built-in demo, and evaluates on its split."""
    return not cfg.train_files and cfg.train_shards is None


def has_retrieval_eval(cfg: DataSettings) -> bool:
    """Whether build_eval_data finds held-out retrieval data (data.eval_file, or the demo's split)."""
    return cfg.eval_file is not None or trains_on_demo(cfg)


def _demo(cfg: DataSettings) -> dict[str, str]:
    demo = cfg.demo
    return ensure_demo_data(n=demo.n, seed=demo.seed, eval_n=demo.eval_n, size=demo.size)
