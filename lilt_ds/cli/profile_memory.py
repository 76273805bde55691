"""Will a config fit my GPUs, and what is the largest micro batch? Per-GPU memory by category.

    lilt-profile-memory --config lilt --deepspeed_config zero2 --world_size 4 --micro_batch 128 --gpu_memory 32GB
    lilt-profile-memory --config lilt --deepspeed_config zero2 --measure
    deepspeed --num_gpus 4 --module lilt_ds.cli.profile_memory --config clip --deepspeed_config zero3 --measure

The estimate needs no GPU (activations are measured by one forward pass on this machine's device).
--measure also runs two real DeepSpeed steps on the present device(s) and prints the measured
figures next to the estimate. Writes estimate.md/.csv/.png (and measured.md/.csv) to --output_dir.
"""

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__, launcher=True)
    parser.add_argument(
        "--config",
        default="lilt",
        help="preset (clip, lit, lilt, lilt_ln, lilt_bitfit, lilt_lora, demo) or a YAML path",
    )
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value (dotted or alias) or +key=value")
    parser.add_ds_config_argument(dest="ds_config")
    parser.add_argument(
        "--world_size", type=int, default=None, help="GPUs in all (default: the launched processes, else 1)"
    )
    parser.add_argument(
        "--micro_batch", type=int, default=None, help="per GPU (default: the ds_config's, else train.micro_batch_size)"
    )
    parser.add_argument(
        "--gpu_memory", default=None, help="GPU size for a verdict and the largest micro batch, e.g. 32GB, 80GiB"
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of the GPU kept free for the CUDA context, allocator slack and transient buffers (default 0.1)",
    )
    parser.add_argument("--measure", action="store_true", help="also run two real DeepSpeed steps here and compare")
    parser.add_argument(
        "--probe_batch", type=int, default=2, help="samples of the forward pass that measures activations"
    )
    parser.add_argument(
        "--output_dir", default=None, help="where the tables and the chart go (default outputs/memory-<config>)"
    )
    args = parser.parse_args(argv)

    from lilt_ds.tools.memory_report import ProfileRequest, run_profile

    report = run_profile(
        ProfileRequest(
            config=args.config,
            overrides=args.overrides,
            ds_config=args.ds_config,
            world_size=args.world_size,
            micro_batch=args.micro_batch,
            gpu_memory=args.gpu_memory,
            headroom=args.headroom,
            measure=args.measure,
            output_dir=args.output_dir,
            probe_batch=args.probe_batch,
        )
    )
    if report:
        print(report)


def entry():
    """The ``lilt-profile-memory`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
