"""Checkpoint size of a LilT run vs a CLIP run of the same towers (one step each, real DeepSpeed).

    python benchmarks/checkpoint_size.py [--config demo] [--ds_config ds_configs/zero2.json] [--overrides K=V ...]

Prints a Markdown table: files and bytes of one checkpoint folder per mode.
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--ds_config", default=os.path.join("ds_configs", "zero2.json"))
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value of the config, for both runs")
    args = parser.parse_args()
    modes = {
        "clip": ["mode=clip", "model.vision.unlock=[]", "model.text.unlock=[]"],
        "lilt (the preset's unlock sets)": [],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in modes.items():
            out = os.path.join(tmp, name.split()[0])
            subprocess.run(
                [
                    sys.executable,
                    "launch/pretrain.py",
                    "--deepspeed_config",
                    args.ds_config,
                    "--config",
                    args.config,
                    "--output_dir",
                    out,
                    "--overrides",
                    "train.max_steps=1",
                    "eval.every_epochs=0",
                    *args.overrides,
                    *overrides,
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            with open(os.path.join(out, "checkpoints", "latest")) as f:
                folder = os.path.join(out, "checkpoints", f.read().strip())
            export = os.path.getsize(os.path.join(out, "trainable.safetensors"))
            rows.append((name, checkpoint_bytes(folder), export))
    clip = rows[0][1]
    print(f"config {args.config}, {args.ds_config}, one rank\n")
    print("| mode | checkpoint folder | % of clip | trainable export |\n|---|---:|---:|---:|")
    for name, size, export in rows:
        print(f"| {name} | {size / 2**20:.1f} MiB | {100 * size / clip:.1f} % | {export / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
