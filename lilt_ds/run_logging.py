"""What a run reports: the log file, the progress bar, periodic metrics (the loader's share of the step
time among them), wandb, TensorBoard events and results.jsonl.

wandb is optional in every sense: missing, offline or failing, it never stops a run. Without
credentials it logs offline (``wandb sync`` uploads later). TensorBoard events are written by
lilt_ds (torch's SummaryWriter), not by DeepSpeed's monitor, which knows the loss and the learning
rate only: the same scalars as the log line, under ``train/`` and ``eval/`` as in wandb.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import psutil
import torch

from . import ds_compat

log = logging.getLogger("lilt_ds")


def setup_logging(output_dir: str, rank: int, quiet: bool = False) -> None:
    """Rank 0 logs INFO to the console (warnings only when ``quiet``) and to ``train.log``; other
    ranks log warnings only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING if quiet else logging.NOTSET)
    log.addHandler(console)
    if rank == 0:
        file = logging.FileHandler(os.path.join(output_dir, "train.log"))
        file.setFormatter(fmt)
        log.addHandler(file)


def memory_in_use(device: torch.device) -> float:
    """GiB held: allocated accelerator memory, or this process's resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _has_wandb_credentials() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))


def start_wandb(cfg, output_dir: str):
    """A wandb run, or None when disabled or unavailable (never an exception)."""
    if cfg.logging.disable_wandb:
        return None
    try:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")
        return wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_run_name,
            dir=output_dir,
            config=cfg.to_dict(),
            mode=mode,
        )
    except Exception as e:  # noqa: BLE001 - wandb must never fail a run
        log.warning("wandb unavailable (%s: %s): continuing without it", type(e).__name__, e)
        return None


class MetricLogger:
    """Rank 0's reporting: every ``train.log_every`` steps a log line, a line of ``steps.jsonl`` (and
    wandb); each evaluation a line of ``results.jsonl`` (OpenCLIP's convention)."""

    def __init__(self, cfg, output_dir: str, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.results_path = os.path.join(output_dir, "results.jsonl")
        self.steps_path = os.path.join(output_dir, "steps.jsonl")
        self.wandb = start_wandb(cfg, output_dir) if rank == 0 else None
        self.tensorboard = None
        if rank == 0 and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.window_samples, self.window_time, self.window_wait, self.bar = 0, 0.0, 0.0, None
        self.data_wait_warned = False

    def progress(self, loader, epoch: int, step: int, total_steps: int):
        """Iterate the loader, with a progress bar on rank 0; the time spent waiting for each batch is
        counted (``data_wait`` in the metrics)."""
        if self.rank != 0:
            return loader
        from tqdm import tqdm

        self.bar = tqdm(loader, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False, file=sys.stderr)
        return self._timed(self.bar)

    def _timed(self, batches):
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.window_wait += time.perf_counter() - start
            yield batch

    def step(self, step: int, loss: float, engine, seconds: float, samples_per_rank: int) -> None:
        self.window_samples += samples_per_rank
        self.window_time += seconds
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.set_postfix(step=step, loss=f"{loss:.4f}")
        if step % self.cfg.train.log_every and step != 1:
            return
        per_device = self.window_samples / max(self.window_time, 1e-9)
        scale = _logit_scale(engine.module.logit_scale)
        data_wait = self.window_wait / max(self.window_wait + self.window_time, 1e-9)
        metrics = {
            "loss": loss,
            "lr": engine.get_lr()[0],
            "logit_scale": scale,
            "samples_per_s": per_device * self.world_size,
            "samples_per_s_per_device": per_device,
            "data_wait": data_wait,
            "memory_gib": memory_in_use(engine.device),
        }
        self.window_samples, self.window_time, self.window_wait = 0, 0.0, 0.0
        if step > 1:  # the first window includes the workers' start
            self.warn_data_wait(data_wait)
        seen = step * engine.train_batch_size()  # samples seen by all ranks: a stream's clock
        log.info("step %d samples_seen %d " + " ".join(f"{k}=%.4g" for k in metrics), step, seen, *metrics.values())
        metrics["samples_seen"] = seen
        with open(self.steps_path, "a") as f:  # full precision, for comparing runs step by step
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.publish("train", metrics, step)

    def warn_data_wait(self, data_wait: float) -> None:
        """Once per run: the loader cannot keep up, and what helps."""
        limit = self.cfg.logging.data_wait_warning
        if self.data_wait_warned or not limit or data_wait <= limit:
            return
        self.data_wait_warned = True
        data = self.cfg.data
        log.warning(
            "the steps waited for data %.0f%% of the time (over logging.data_wait_warning=%g): the loader cannot "
            "keep up. Raise data.num_workers (now %s), decode JPEGs on the GPU (data.decode=device), or, with a "
            "locked image tower, train on cached features (data.cache_locked_features=true)",
            100 * data_wait,
            limit,
            data.num_workers,
        )

    def evaluation(self, step: int, epoch: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "epoch": epoch, "time": time.time(), **metrics}
        with open(self.results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("eval epoch %d step %d: %s", epoch, step, " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        self.publish("eval", metrics, step)

    def publish(self, prefix: str, metrics: dict, step: int) -> None:
        """Scalars to wandb and TensorBoard, where on."""
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)
            self.tensorboard.flush()

    def event(self, step: int, epoch: int, record: dict) -> None:
        """A line of results.jsonl that is not an evaluation (early stopping)."""
        if self.rank != 0:
            return
        with open(self.results_path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "time": time.time(), **record}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _logit_scale(param: torch.Tensor) -> float:
    """exp(logit_scale) read on rank 0 alone, also under ZeRO-3: rank 0's partition starts at element 0."""
    held = param if param.numel() else ds_compat.zero3_partition(param)
    if held is None or held.numel() == 0:
        return float("nan")
    return held.detach().flatten()[0].float().exp().item()
