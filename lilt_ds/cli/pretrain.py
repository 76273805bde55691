"""Train a dual encoder:

    deepspeed --module lilt_ds.cli.pretrain --deepspeed_config zero2 [...]
    lilt-pretrain [...]      (one process, without the launcher)

With no other argument it trains the `demo` config on the built-in demo data. A run stopped by one of
`train.stop_signals` (a scheduler's preemption notice) saves a checkpoint and exits with status 75;
`--resume auto` continues it (and starts fresh when the output folder holds no checkpoint yet).
"""

import sys

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__, launcher=True)
    parser.add_argument(
        "--config",
        default="demo",
        help="preset (clip, lit, lilt, lilt_ln, lilt_bitfit, lilt_lora, demo) or a YAML path",
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="key=value (dotted or alias) or +key=value to add a key"
    )
    parser.add_argument("--output_dir", default=None, help="run folder (default outputs/<config>-<time>)")
    parser.add_argument(
        "--resume",
        default=None,
        help="auto (the newest checkpoint of --output_dir that loads, else a fresh start: one command for the "
        "first start and every requeue), latest (this output_dir's newest), or a checkpoint folder",
    )
    parser.add_ds_config_argument()
    args = parser.parse_args(argv)

    from lilt_ds.config import load_config
    from lilt_ds.preemption import PREEMPTED_EXIT_STATUS
    from lilt_ds.train import train

    output_dir = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = load_config(args.config, [*args.overrides, *output_dir])
    if args.resume == "auto" and cfg.output_dir is None:
        parser.error("--resume auto resumes the run in --output_dir (or output_dir=...): give a fixed folder")
    if "stopped_by" in train(cfg, args.deepspeed_config, resume=args.resume):
        sys.exit(PREEMPTED_EXIT_STATUS)


def entry():
    """The ``lilt-pretrain`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
