"""Zero-shot retrieval or classification of a checkpoint, an export or the untrained base towers.

    python launch/evaluate.py --checkpoint outputs/run --task retrieval --data eval.json --image_root DIR
    python launch/evaluate.py --checkpoint run.safetensors --task classification --data imagenet/val --templates imagenet
    deepspeed --num_gpus 2 launch/evaluate.py ...      (each rank encodes a shard; same numbers)
"""

import sys

from lilt_ds.config import ConfigError
from lilt_ds.data import DataError
from lilt_ds.evaluate import main

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
