"""Resume against the uninterrupted run, bit for bit, and where DeepSpeed's CPU Adam alone would differ.

    python benchmarks/resume_exactness.py [--config demo] [--ds_config ds_configs/zero2.json] [--steps 24]
        [--every 2] [--resume_from 2 4 8 16 20] [--keep_precision] [--overrides K=V ...]

One uninterrupted fp32 run (the ds_config with bf16 off; --keep_precision: as it is) saves a
checkpoint every ``--every`` steps; a resumed run from each ``--resume_from`` step trains to the
same end. The table gives, per resume step,
the largest relative difference of the logged losses after it and the largest absolute difference of
the final trainable weights (0 and 0: bit for bit), and whether DeepSpeed's C++ CPU Adam would have
resumed exactly without lilt_ds's replay (``lilt_ds.ds_compat.replay_cpu_adam_steps``), predicted
from float32 arithmetic alone.

The prediction: that Adam (``cpu_adam.h``, ``IncrementStep``; behind DeepSpeedCPUAdam and the CPU
accelerator's FusedAdam) keeps beta^t as a float32 running product, step after step; a new process
whose first step is t = k + 1 sets it to ``pow(beta, t)`` computed in double and rounded to float32,
and multiplies on from there. Without the replay, resume is exact iff both bias corrections,
``1 - beta1^t`` and ``1 / sqrt(1 - beta2^t)`` in float32, agree with the uninterrupted run's at every
step up to the end. CUDA's FusedAdam recomputes them from the step each time.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32


@functools.lru_cache(maxsize=8)
def cpu_adam_bias_corrections(beta: float, first: int, last: int, restart: int | None) -> tuple[tuple, ...]:
    """(1 - beta^t, 1 / sqrt(1 - beta^t)) in float32 for t = first..last as CPU Adam computes them,
    for a run whose optimizer was built fresh at step ``restart`` (None: never, the uninterrupted run)."""
    b, power, out = F32(beta), F32(1.0), []
    for t in range(1, last + 1):
        power = F32(float(b) ** t) if t == restart else F32(power * b)
        if t >= first:
            out.append((F32(F32(1.0) - power), F32(F32(1.0) / np.sqrt(F32(F32(1.0) - power)))))
    return tuple(out)


def resume_is_exact(checkpoint_step: int, last_step: int, betas: tuple[float, float]) -> bool:
    """Whether CPU Adam's bias corrections after resuming from ``checkpoint_step`` equal the
    uninterrupted run's at every step up to ``last_step`` (beta1's first term, beta2's second)."""
    first = checkpoint_step + 1
    for beta, term in zip(betas, (0, 1)):
        straight = cpu_adam_bias_corrections(beta, 1, last_step, None)[checkpoint_step:]
        resumed = cpu_adam_bias_corrections(beta, first, last_step, first)
        if any(a[term] != b[term] for a, b in zip(straight, resumed)):
            return False
    return True


def train(out: str, ds_config: str, config: str, steps: int, every: int, overrides: list[str], resume=None) -> None:
    command = [sys.executable, "launch/pretrain.py", "--deepspeed_config", ds_config, "--config", config]
    command += ["--output_dir", out] + (["--resume", resume] if resume else [])
    command += ["--overrides", f"train.max_steps={steps}", f"checkpoint.every_steps={every}", "train.log_every=1"]
    command += ["eval.every_epochs=0", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "steps.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def weights(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "trainable.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--ds_config", default=os.path.join("ds_configs", "zero2.json"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    parser.add_argument("--resume_from", type=int, nargs="+", default=[2, 4, 8, 16, 20])
    parser.add_argument("--keep_precision", action="store_true", help="the ds_config's bf16 setting (default: off)")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value of the config, for every run")
    args = parser.parse_args()
    bad = [k for k in args.resume_from if k % args.every or not 0 < k < args.steps]
    if bad:
        sys.exit(f"--resume_from {bad}: each must be a checkpoint step (a multiple of --every) below --steps")
    with open(os.path.join(ROOT, args.ds_config)) as f:
        ds = json.load(f)
    if not args.keep_precision:
        ds["bf16"] = {"enabled": False}
    betas = tuple(ds.get("optimizer", {}).get("params", {}).get("betas", (0.9, 0.999)))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.json")
        with open(fp32, "w") as f:
            json.dump(ds, f)
        straight = os.path.join(tmp, "straight")
        train(straight, fp32, args.config, args.steps, args.every, args.overrides)
        base_losses, base_weights = losses(straight), weights(straight)
        for k in args.resume_from:
            out = os.path.join(tmp, f"from{k}")
            ckpt = os.path.join(straight, "checkpoints", f"step{k}")
            train(out, fp32, args.config, args.steps, args.every, args.overrides, resume=ckpt)
            got = losses(out)
            loss_diff = max(abs(got[s] - base_losses[s]) / abs(base_losses[s]) for s in got if s > k)
            w = weights(out)
            weight_diff = max((w[n].double() - base_weights[n].double()).abs().max().item() for n in w)
            rows.append((k, resume_is_exact(k, args.steps, betas), loss_diff, weight_diff))

    precision = f"bf16 {ds.get('bf16', {}).get('enabled', False)}"
    print(f"config {args.config}, {args.ds_config} ({precision}), one rank, {args.steps} steps, betas {betas}\n")
    print(
        "| resumed from step | max rel. loss diff after it | max abs. weight diff at the end "
        "| exact without the replay (predicted) |"
    )
    print("|---:|---:|---:|---|")
    for k, exact, loss_diff, weight_diff in rows:
        print(f"| {k} | {loss_diff:.2g} | {weight_diff:.2g} | {'yes' if exact else 'no'} |")
    horizon = 1000
    exact = [k for k in range(1, horizon) if resume_is_exact(k, horizon, betas)]
    shown = ", ".join(map(str, exact[:20])) + (", ..." if len(exact) > 20 else "")
    print(
        f"\nwithout the replay, predicted exact resumes of a {horizon}-step run: {len(exact)} of {horizon - 1} "
        f"checkpoint steps ({shown})"
    )


if __name__ == "__main__":
    main()
