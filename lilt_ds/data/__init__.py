"""Data for contrastive pretraining: caption JSON files in the original LilT format (or tar shards
in the WebDataset layout), image and text preprocessing, a resumable distributed sampler,
retrieval evaluation data and the built-in demo dataset. `build_train_loader` and
`build_eval_data` build it all from the `data` section of the experiment config."""

from .bad_samples import BadSample, BadSampleLog, global_bad_sample_counts
from .caption_dataset import CaptionDataset
from .config import eval_loader_settings, loader_settings, resolve_data_config
from .demo import ensure_demo_data, generate_demo
from .errors import DataError
from .evaluation.classification import build_zeroshot_data, check_zeroshot, load_templates, read_classnames
from .evaluation.retrieval import RetrievalData, RetrievalImages, build_retrieval_data, collate_images
from .feature_cache import cache_locked_features
from .index.captions import CaptionTable, load_caption_files
from .index.image_root import ImageRoot
from .loader import TrainLoader, build_eval_data, build_train_loader
from .preprocessing.collate import ImageTextCollator
from .preprocessing.device_decode import decode_on_device
from .preprocessing.source_transforms import eval_preprocess_of
from .preprocessing.text import pre_caption, tokenize_captions
from .preprocessing.transforms import (
    LILT_RANDAUGMENT_OPS,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    normalize_pixels,
)
from .sampler import ResumableDistributedSampler
from .shards.dataset import ShardDataset
from .shards.files import ShardFiles, find_shards
from .shards.progress import ShardProgress
from .shards.stream import ResampledShardDataset, StreamProgress
from .shards.writer import write_shards

__all__ = [
    "BadSample",
    "BadSampleLog",
    "CaptionDataset",
    "CaptionTable",
    "DataError",
    "ImageRoot",
    "ImageTextCollator",
    "LILT_RANDAUGMENT_OPS",
    "ResumableDistributedSampler",
    "RetrievalData",
    "RetrievalImages",
    "ShardDataset",
    "ShardFiles",
    "ShardProgress",
    "ResampledShardDataset",
    "StreamProgress",
    "TrainLoader",
    "build_eval_data",
    "cache_locked_features",
    "build_zeroshot_data",
    "check_zeroshot",
    "load_templates",
    "read_classnames",
    "build_eval_transform",
    "build_retrieval_data",
    "build_train_loader",
    "build_train_transform",
    "normalize_pixels",
    "decode_on_device",
    "eval_preprocess_of",
    "TrainTransform",
    "collate_images",
    "ensure_demo_data",
    "eval_loader_settings",
    "find_shards",
    "generate_demo",
    "global_bad_sample_counts",
    "load_caption_files",
    "loader_settings",
    "pre_caption",
    "resolve_data_config",
    "tokenize_captions",
    "write_shards",
]
