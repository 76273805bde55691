"""The training loop, top to bottom: set-up, steps with accumulation, logging, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time

import torch

from . import checkpoint as ckpt
from . import engine as ds_engine
from . import runtime
from .allocator import ENV as ALLOCATOR_ENV
from .allocator import retain_freed_memory
from .data import (
    build_eval_data,
    build_train_loader,
    build_zeroshot_data,
    cache_locked_features,
    decode_on_device,
    eval_loader_settings,
    eval_preprocess_of,
    global_bad_sample_counts,
    normalize_pixels,
    resolve_data_config,
)
from .data.evaluation.datasets import CLASSIFICATION, RETRIEVAL, dataset_name
from .distributed import all_gather_objects, is_collective_failure
from .errors import ConfigError, LiltError
from .evaluate import (
    clip_benchmark_record,
    evaluate_classification,
    evaluate_retrieval,
    format_retrieval_table,
    model_name,
    write_clip_benchmark,
)
from .export import save_exported, trainable_state_from_engine
from .losses import as_fp32, build_loss, exact_accumulation_step
from .models import build_model, build_tokenizer, encode_batch, trainable_summary
from .models.summary import format_summary
from .preemption import PREEMPTED_EXIT_STATUS, StopRequest
from .presets import save_config
from .run_logging import MetricLogger, setup_logging
from .schema import ExperimentConfig
from .tracking import MetricWatch
from .world import launched_world

log = logging.getLogger("lilt_ds")


class NonFiniteLossError(LiltError, RuntimeError):
    """Training diverged: too many non-finite losses in a row, or one that cannot be skipped."""


def prepare_output_dir(cfg: ExperimentConfig, rank: int) -> str:
    """Create (and check we can write to) the run folder before any expensive work.

    Rank 0 decides (the default name has a timestamp) and every rank gets its answer, an error
    included, so no rank is left waiting for one that stopped.
    """
    out, error = cfg.output_dir or os.path.join("outputs", f"{cfg.config_name}-{time.strftime('%Y%m%d-%H%M%S')}"), None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            error = f"output folder {out} is not writable ({e.strerror}): choose another --output_dir"
    decision = [out, error]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(decision, src=0)
    out, error = decision
    if error:
        raise ConfigError(error)
    return out


def checkpoint_folder(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def due(every_epochs: int, epoch: int, last: bool) -> bool:
    """An evaluation every ``every_epochs`` epochs (and after the last; 0: never) runs now."""
    return bool(every_epochs) and (epoch % every_epochs == 0 or last)


def to_device(batch: dict, device, dtype, mean, std) -> dict:
    """The model's inputs of a batch on the device, images (or cached image features) in ``dtype``: uint8
    pixels are normalised with the image tower's ``mean``/``std`` there (a quarter of the bytes to copy)."""
    if "image_features" in batch:
        images = {"image_features": batch["image_features"].to(device, dtype, non_blocking=True)}
    else:
        pixels = batch["images"].to(device, non_blocking=True)
        if "encoded_images" in batch:  # data.decode=device
            pixels = decode_on_device(pixels, batch["encoded_images"], batch["index"])
        images = {"images": normalize_pixels(pixels, mean, std, dtype)}
    return {
        **images,
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
    }


class Trainer:
    """Holds what the loop needs; ``run()`` reads top to bottom like nanoGPT's loop.

    ``model``: a DualEncoder built from ``cfg`` already (the throughput benchmark prepares it), else
    ``build_model(cfg)``; ``quiet``: warnings only on the console (the run's log file is complete).
    """

    def __init__(
        self, cfg: ExperimentConfig, ds_config_path: str, resume: str | None = None, model=None, quiet: bool = False
    ):
        self.cfg = cfg
        runtime.set_deterministic(cfg.train.deterministic)  # before anything reaches the device
        # binds the device first; a collective that waits longer than the timeout ends the run
        self.launcher = "an existing process group" if torch.distributed.is_initialized() else launched_world().launcher
        self.rank, self.world_size, self.device = runtime.init_distributed(cfg.train.collective_timeout_s)
        if cfg.data.decode == "device" and self.device.type != "cuda":
            raise ConfigError(
                f"data.decode = device decodes JPEGs with nvJPEG on a CUDA GPU, and this run's device is "
                f"{self.device.type}: set data.decode=cpu (the default)"
            )
        self.output_dir = prepare_output_dir(cfg, self.rank)
        setup_logging(self.output_dir, self.rank, quiet)
        if self.device.type == "cpu" and retain_freed_memory():  # DeepSpeed's per-step temporaries page-fault otherwise
            log.info(
                "CPU run: freed host memory is kept for reuse (lilt_ds.allocator; %s=system turns it off)",
                ALLOCATOR_ENV,
            )
        ds_raw = ds_engine.load_ds_config(ds_config_path)
        self.resume_from = ckpt.resume_candidates(resume, checkpoint_folder(self.output_dir))
        self.resume_auto = resume == "auto"

        self.tokenizer = build_tokenizer(cfg.model)
        self.model = model if model is not None else build_model(cfg)
        mean, std, size = self.model.vision.mean, self.model.vision.std, self.model.vision.image_size
        data = resolve_data_config(cfg.data)
        self.loader = build_train_loader(
            data,
            self.tokenizer,
            size,
            mean,
            std,
            self.rank,
            self.world_size,
            cfg.train.micro_batch_size,
            cfg.seed,
            self.device.type,
        )
        preprocess = eval_preprocess_of(self.model.vision, cfg.eval.preprocess)
        self.eval_data = build_eval_data(data, self.tokenizer, size, mean, std, preprocess)
        zeroshot = cfg.eval.classification
        self.zeroshot = (
            None
            if zeroshot.data is None
            else build_zeroshot_data(
                zeroshot.data,
                size,
                mean,
                std,
                zeroshot.image_root,
                zeroshot.classnames,
                zeroshot.templates,
                preprocess,
                "eval.classification.data",
            )
        )
        self.eval_workers, self.eval_pin_memory = eval_loader_settings(data, self.device.type)

        accum = cfg.train.grad_accum_steps
        self.steps_per_epoch = self.loader.batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch has {self.loader.batches_per_epoch} micro-batches per rank, fewer than "
                f"train.grad_accum_steps={accum}: lower it or add data"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, int(cfg.train.max_steps))
        self.ds_config = ds_engine.resolve_ds_config(ds_raw, cfg, self.world_size, self.total_steps, ds_config_path)
        self.dtype = ds_engine.engine_dtype(self.ds_config)
        self.loss_fn = build_loss(cfg.loss)
        self.loss_fn.static_batches = True  # the loader drops incomplete batches: no per-call size exchange
        if self.rank == 0:  # the resolved config says where the run went
            save_config(
                dataclasses.replace(cfg, output_dir=self.output_dir), os.path.join(self.output_dir, "config.yaml")
            )
            with open(os.path.join(self.output_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=2)
        log.info("parameters (trainable only reach DeepSpeed):\n%s", format_summary(trainable_summary(self.model)))
        self.identity = ckpt.run_identity(cfg, self.model)  # before DeepSpeed casts and partitions
        self.feature_cache = None
        if data.cache_locked_features:  # its build runs the tower (in the engine's precision) before the engine exists
            self.feature_cache = cache_locked_features(
                self.loader.dataset,
                self.model,
                data,
                {"name": cfg.model.vision.name, "image_size": size},
                self.device,
                self.dtype,
                cfg.eval.batch_size,
                self.loader.loader.num_workers,
            )

        self.engine, self.optimizer, self.scheduler = ds_engine.initialize(
            self.model, self.ds_config, cfg, self.total_steps
        )
        runtime.seed_everything(cfg.seed + 1000 * self.rank)  # per-rank dropout noise
        self.step, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0
        self.restored_rng = None
        self.last_saved_step = None
        self.metrics = MetricLogger(cfg, self.output_dir, self.rank, self.world_size)
        self.stop = StopRequest(cfg.train.stop_signals, self.device)
        self.stop_agreed = False
        stopping = cfg.train.early_stopping
        self.keep_best = MetricWatch(cfg.checkpoint.keep_best) if cfg.checkpoint.keep_best else None
        self.early_stopping = MetricWatch(stopping.metric, stopping.min_delta) if stopping.metric else None
        self.early_stopped = False
        self.resume()

    def to_device(self, batch: dict) -> dict:
        """A loader batch as the model's inputs on this rank's device (``to_device``)."""
        return to_device(batch, self.device, self.dtype, self.model.vision.mean, self.model.vision.std)

    def resume(self) -> None:
        """Load the first of the resume candidates that every rank loads (``--resume auto``: else the next
        older one, with a warning; a path: an error naming what failed); none (a first start): nothing."""
        if not self.resume_from and self.resume_auto:
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", checkpoint_folder(self.output_dir))
        for position, (folder, tag) in enumerate(self.resume_from):
            try:
                self.load_checkpoint(folder, tag)
                error = None
            except ConfigError as e:
                error = str(e)
            failed = [e for e in all_gather_objects(error) if e is not None]
            if not failed:
                return
            if not self.resume_auto or position == len(self.resume_from) - 1:
                raise ConfigError(failed[0])
            log.warning("--resume auto: %s; trying the checkpoint before it", failed[0])

    @property
    def epoch(self) -> int:
        """The epoch the loader is in (its sampler holds it, and a checkpoint restores it)."""
        return self.loader.sampler.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, micro_batches: list[dict]) -> float:
        """Forward/backward every micro-batch, one optimizer step; returns the loss of the step.

        One host sync per step: the loss value, read before the backward or update it could spoil.
        A NaN/inf loss (non-finite on every rank at once: the feature gather carries it) skips the
        step: returns it before any backward. With naive accumulation the value is read at the
        last micro-batch, when DeepSpeed has already accumulated the others: the run stops with a
        clear error instead (exact accumulation reads it before any backward and can skip).
        """
        engine = self.engine
        self.loss_fn.step_signal = self.stop.flag  # 1 once this rank got a stop signal
        if self.cfg.train.exact_accumulation:

            def backward(loss):
                engine.backward(loss, scale_wrt_gas=False)  # each pass gives its micro-batch's exact share
                engine.step()

            read = []

            def check(loss):  # the first loss already is the whole step's, before any backward
                read.append(self.read_step(loss))  # the step's one host sync
                if not math.isfinite(read[0]):
                    raise _SkippedStep(read[0])

            try:
                exact_accumulation_step(
                    lambda *a, **k: as_fp32(engine(*a, **k)),
                    micro_batches,
                    self.loss_fn,
                    backward,
                    before_backward=check,
                )
            except _SkippedStep as skipped:
                return skipped.loss
            return read[0]
        total = None
        for i, batch in enumerate(micro_batches):
            loss = self.loss_fn(*as_fp32(encode_batch(engine, batch)))
            share = loss.detach() / len(micro_batches)
            total = share if total is None else total + share
            if i == len(micro_batches) - 1:
                value = self.read_step(total)  # the step's one host sync (total is detached)
                if not math.isfinite(value):
                    if i == 0:
                        return value
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) in step {self.step + 1} ({self.loss_fn.nonfinite_report()}): "
                        f"with train.grad_accum_steps={len(micro_batches)} the earlier micro-batches are already "
                        "accumulated, so the step cannot be skipped. Set train.exact_accumulation=true (or "
                        "train.grad_accum_steps=1) to skip such steps"
                    )
            engine.backward(loss)
            engine.step()
        return value

    def read_step(self, loss: torch.Tensor) -> float:
        """The step's loss, and whether any rank was asked to stop (summed in the loss's all-reduce),
        in one host sync."""
        value, stops = torch.stack([loss.detach().reshape(()), self.loss_fn.summed_step_signal.reshape(())]).tolist()
        self.stop_agreed = stops > 0
        return value

    def optimizer_step(self, micro_batches: list[dict]) -> float:
        """All the loop does per optimizer step, on batches already on the device: ``train_step``,
        the skip of a non-finite step, the temperature clamp, the step count and the metrics.

        Returns the step's loss (non-finite when the step was skipped). benchmarks/throughput.py
        times this method, so what it measures is what a run does.
        """
        start = time.perf_counter()
        loss = self.train_step(micro_batches)
        if not math.isfinite(loss):
            self.skip_nonfinite(loss)
            return loss
        self.nonfinite_in_row = 0
        ds_engine.clamp_logit_scale(self.engine)
        self.step += 1
        self.metrics.step(
            self.step,
            loss,
            self.engine,
            time.perf_counter() - start,
            self.cfg.train.micro_batch_size * len(micro_batches),
        )
        return loss

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        """The whole run; a stop signal ends it early with a checkpoint (``results["stopped_by"]``)."""
        self.stop.install()
        try:
            return self._run()
        except RuntimeError as e:
            if not is_collective_failure(e):
                raise
            raise CollectiveFailed(
                f"rank {self.rank}: a collective failed ({str(e).splitlines()[0][:300]}): another rank died or "
                f"stopped answering for train.collective_timeout_s={self.cfg.train.collective_timeout_s:g} s, so "
                "this run ended instead of waiting for the job's time limit. Resume it with --resume auto"
            ) from e
        finally:
            self.stop.uninstall()

    def _run(self) -> dict:
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        log.info(
            "training %d steps (%d per epoch), %d rank(s) started by %s, micro batch %d x accumulation %d, "
            "ds_config stage %s %s",
            self.total_steps,
            self.steps_per_epoch,
            self.world_size,
            self.launcher,
            cfg.train.micro_batch_size,
            accum,
            self.ds_config.get("zero_optimization", {}).get("stage", 0),
            self.dtype,
        )
        results = {}
        while self.step < self.total_steps:
            pending = []
            batches = iter(self.metrics.progress(self.loader, self.epoch, self.step, self.total_steps))
            if self.restored_rng is not None:
                # the DataLoader draws its seed from the global RNG when its first batch is asked for;
                # the interrupted run had done that at the start of the epoch, so restore after it
                batches = itertools.chain([next(batches)], batches)
                runtime.set_rng_state(self.restored_rng)
                self.restored_rng = None
            for batch in batches:
                pending.append(self.to_device(batch))
                if len(pending) < accum:
                    continue
                loss = self.optimizer_step(pending)
                pending = []
                if self.stop_agreed:
                    break
                if not math.isfinite(loss):
                    continue
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    results = {**results, **self.evaluate()}
                    if self.early_stopped:
                        break
            if self.stop_agreed:
                return self.stop_here()
            if self.early_stopped:
                break
            bad = global_bad_sample_counts(self.loader.dataset.bad_samples)
            if bad["replaced"] or bad["bad_entries"]:
                log.warning("epoch %d: %s bad samples replaced (all ranks)", self.epoch, bad)
            self.epoch += 1
            last = self.step >= self.total_steps
            by_steps = last and cfg.eval.every_steps is not None  # a run evaluated by steps ends with one too
            metrics = self.evaluate(
                retrieval=due(cfg.eval.every_epochs, self.epoch, last) or by_steps,
                zeroshot=due(cfg.eval.classification.every_epochs, self.epoch, last) or by_steps,
            )
            results = {**results, **metrics}
            if self.early_stopped:
                break
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        self.export()
        self.verify_replicas()
        if "txt_r1" in results and self.rank == 0:
            print("\nretrieval on the held-out split after training:\n" + format_retrieval_table(results), flush=True)
        if "zeroshot_top1" in results and self.rank == 0:
            print(
                f"zero-shot classification after training: top-1 {results['zeroshot_top1']:.2f}, "
                f"top-5 {results['zeroshot_top5']:.2f}",
                flush=True,
            )
        self.metrics.close()
        return results

    def stop_here(self) -> dict:
        """Every rank agreed to stop (a signal on one of them): checkpoint this step boundary and end."""
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        who = self.stop.received or "a signal on another rank"
        log.warning(
            "stopped by %s at step %d: checkpoint saved; the run ends with exit status %d (resume it with "
            "--resume auto)",
            who,
            self.step,
            PREEMPTED_EXIT_STATUS,
        )
        self.metrics.close()
        return {"stopped_by": who, "step": self.step}

    def skip_nonfinite(self, loss: float) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.engine.zero_grad()
        log.warning(
            "non-finite loss (%s) at step %d, %s: step skipped (%d in a row, %d in total)",
            loss,
            self.step,
            self.loss_fn.nonfinite_report(),
            self.nonfinite_in_row,
            self.nonfinite_total,
        )
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}: training diverged. "
                "Lower train.lr, raise train.warmup_steps, or check the data; "
                f"the limit is train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}"
            )

    def evaluate(self, retrieval: bool = True, zeroshot: bool = True) -> dict:
        """Retrieval on the held-out split and zero-shot classification (``eval.classification``), each
        where asked and configured; every rank encodes a shard. Rank 0 logs what was measured, in
        results.jsonl and in CLIP_benchmark's files beside it (``clip_benchmark/<dataset>.json``)."""
        metrics, records = {}, []
        if retrieval and self.eval_data is not None:
            found = evaluate_retrieval(
                self.engine.module,
                self.eval_data,
                self.cfg.eval.batch_size,
                self.device,
                self.dtype,
                self.eval_workers,
                self.eval_pin_memory,
            )
            metrics.update(found)
            records.append((dataset_name(self.cfg.data.eval_file or "demo_eval"), RETRIEVAL, found))
        if zeroshot and self.zeroshot is not None:
            images, templates = self.zeroshot
            scores = evaluate_classification(
                self.engine.module,
                images,
                self.tokenizer,
                templates,
                self.cfg.eval.batch_size,
                self.device,
                self.dtype,
                self.cfg.data.eval_max_length,
                self.eval_workers,
                self.eval_pin_memory,
            )
            metrics.update(
                {
                    "zeroshot_top1": scores["top1"],
                    "zeroshot_top5": scores["top5"],
                    "zeroshot_mean_per_class_recall": scores["mean_per_class_recall"],
                }
            )
            records.append((dataset_name(self.cfg.eval.classification.data), CLASSIFICATION, scores))
        if metrics:
            self.metrics.evaluation(self.step, self.epoch, metrics)
            self.watch(metrics)
        if self.rank == 0:
            for dataset, task, found in records:
                record = clip_benchmark_record(dataset, task, found, model_name(self.cfg), self.output_dir)
                write_clip_benchmark(self.output_dir, {**record, "step": self.step, "epoch": self.epoch})
        return metrics

    @property
    def watches(self) -> dict[str, MetricWatch]:
        """The held-out metrics this run watches, by what they serve (saved in every checkpoint)."""
        watched = {"keep_best": self.keep_best, "early_stopping": self.early_stopping}
        return {name: watch for name, watch in watched.items() if watch is not None}

    def watch(self, metrics: dict) -> None:
        """After an evaluation (every rank measured the same numbers, so every rank decides alike): save
        and mark a new best checkpoint (checkpoint.keep_best), and end the run once the early-stopping
        metric has not improved for train.early_stopping.patience evaluations."""
        if self.keep_best is not None and self.keep_best.update(metrics, self.step):
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            if self.rank == 0:
                record = {"metric": self.keep_best.metric, "value": self.keep_best.best, "step": self.step}
                ckpt.mark_best(checkpoint_folder(self.output_dir), f"step{self.step}", record)
                log.info("best checkpoint: step%d, %s=%.4g", self.step, self.keep_best.metric, self.keep_best.best)
        watch, patience = self.early_stopping, self.cfg.train.early_stopping.patience
        if watch is not None and watch.update(metrics, self.step) is False and watch.stale >= patience:
            self.early_stopped = True
            log.warning(
                "early stopping at step %d: %s has not improved for %d evaluations (best %.4g at step %s; "
                "train.early_stopping.patience=%d)",
                self.step,
                watch.metric,
                watch.stale,
                watch.best,
                watch.best_step,
                patience,
            )
            self.metrics.event(
                self.step, self.epoch, {"early_stopped": True, **watch.state_dict(), "patience": patience}
            )

    def export(self) -> None:
        """The trained weights alone (fp32), rebuildable with lilt_ds.load_exported."""
        state = trainable_state_from_engine(self.engine)
        if self.rank == 0:
            path = os.path.join(self.output_dir, "trainable.safetensors")
            save_exported(state, self.cfg.to_dict(), self.identity, path)
            log.info("exported the %d trained tensors to %s", len(state), path)

    def verify_replicas(self) -> None:
        """Data parallelism must end with the same trainable weights on every rank: check it."""
        digests = [None] * self.world_size
        torch.distributed.all_gather_object(digests, ds_engine.trainable_fingerprint(self.engine))
        if len(set(digests)) == 1:
            log.info("trainable weights identical on all %d rank(s): sha256 %s", self.world_size, digests[0][:16])
        else:
            log.error("trainable weights differ between ranks: %s", [d[:16] for d in digests])

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.loader.sampler.state_dict(),
            "bad_samples": self.loader.dataset.bad_samples.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "watches": {name: watch.state_dict() for name, watch in self.watches.items()},
        }
        meta = {
            "identity": self.identity,
            "world_size": self.world_size,
            "step": self.step,
            "client_state": state,
            "config": self.cfg.to_dict(),
        }
        path = ckpt.save_checkpoint(
            self.engine,
            checkpoint_folder(self.output_dir),
            self.step,
            state,
            meta,
            self.rank,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.last_saved_step = self.step
        log.info("checkpoint saved: %s", path)

    def load_checkpoint(self, folder: str, tag: str) -> None:
        state = ckpt.load_checkpoint(self.engine, folder, tag, self.identity, self.world_size, self.rank)
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.loader.sampler.load_state_dict(state["sampler"])  # a finished epoch is saved as the start of the next
        if "bad_samples" in state:  # checkpoints before it was saved have none
            self.loader.dataset.bad_samples.load_state_dict(state["bad_samples"])
        self.restored_rng = state.get("rng")
        for name, watch in self.watches.items():
            if name in state.get("watches", {}):
                watch.load_state_dict(state["watches"][name])
        if self.scheduler is not None:  # the schedule continues even when its state was not loaded
            self.scheduler.step(self.step)
        log.info("resumed from %s at step %d (epoch %d)", os.path.join(folder, tag), self.step, self.epoch)


class CollectiveFailed(LiltError, RuntimeError):
    """A collective failed or timed out: a rank died or hung (``train.collective_timeout_s``)."""


class _SkippedStep(Exception):
    def __init__(self, loss: float):
        super().__init__(loss)
        self.loss = loss


def train(cfg: ExperimentConfig, ds_config_path: str, resume: str | None = None) -> dict:
    """One whole run, in the launcher's process group (destroyed afterwards if this created it)."""
    with runtime.process_group_scope():
        return Trainer(cfg, ds_config_path, resume).run()
