"""Will a config fit my GPUs, and what is the largest micro batch? Per-GPU memory by category.

    python launch/profile_memory.py --config lilt --deepspeed_config ds_configs/zero2.json \
        --world-size 4 --micro-batch 128 --gpu-memory 32GB
    python launch/profile_memory.py --config lilt --deepspeed_config ds_configs/zero2.json --measure
    deepspeed --num_gpus 4 launch/profile_memory.py --config clip --deepspeed_config ds_configs/zero3.json --measure

The estimate needs no GPU (activations are measured by one forward pass on the CPU).
--measure also runs two real DeepSpeed steps on the present device(s) and prints the measured
figures next to the estimate. Writes estimate.md/.csv/.png (and measured.md/.csv) to --output_dir.
"""

import argparse
import sys

from lilt_ds.config import ConfigError
from lilt_ds.memory import ProfileRequest, run_profile


def parse_args(argv=None) -> ProfileRequest:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="lilt",
                        help="preset (clip, lit, lilt, lilt_ln, lilt_bitfit, lilt_lora, demo) or a YAML path")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value (dotted or alias) or +key=value")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="ds_config", default="ds_configs/zero2.json",
                        help="DeepSpeed JSON config (ZeRO stage, precision, offload, buckets)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in all (default: the launched processes, else 1)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="per GPU (default: the ds_config's, else train.micro_batch_size)")
    parser.add_argument("--gpu-memory", default=None,
                        help="GPU size for a verdict and the largest micro batch, e.g. 32GB, 80GiB")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the GPU kept free for the CUDA context, allocator slack and "
                             "transient buffers (default 0.1)")
    parser.add_argument("--measure", action="store_true", help="also run two real DeepSpeed steps here and compare")
    parser.add_argument("--probe-batch", type=int, default=2, help="samples of the forward pass that measures activations")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                        help="where the tables and the chart go (default outputs/memory-<config>)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    return ProfileRequest(config=args.config, overrides=args.overrides, ds_config=args.ds_config,
                          world_size=args.world_size, micro_batch=args.micro_batch, gpu_memory=args.gpu_memory,
                          headroom=args.headroom, measure=args.measure, output_dir=args.output_dir,
                          probe_batch=args.probe_batch)


def main(argv=None):
    request = parse_args(argv)
    try:
        report = run_profile(request)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if report:
        print(report)


if __name__ == "__main__":
    main()
