"""Checkpoints that hold only what trains, resume exactly, and are never half-written.

Layout of ``<output_dir>/checkpoints``::

    latest                  the tag of the newest complete checkpoint (replaced atomically)
    step200/                a DeepSpeed checkpoint folder, frozen parameters excluded, plus
        lilt_ds_meta.json   mode, model config, world size, frozen-weight fingerprint
        rng_rank{R}.pt      every RNG of rank R (Python, NumPy, torch, its own GPU's)
    step400.partial/        a save in progress (or killed): never picked by ``latest``

A save writes ``<tag>.partial`` on every rank, waits for all of them, then rank 0 renames the folder
and rewrites ``latest`` (both atomic on one filesystem). Loading rebuilds the frozen part from the
configured base towers and checks it against the fingerprint taken when the run started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import torch

from .distributed import barrier
from .errors import ConfigError
from .fileio import atomic_path
from .runtime import rng_state
from .schema import to_plain

log = logging.getLogger("lilt_ds")

LATEST = "latest"
PARTIAL = ".partial"
META = "lilt_ds_meta.json"
FAULT_ENV = "LILT_DS_FAULT_INJECT"  # "kill_in_save:<step>": SIGKILL this process mid-save (tests)


# ---------------------------------------------------------------------------------- what a run is
def frozen_fingerprint(model: torch.nn.Module) -> dict:
    """Names, shapes and a sha256 of every frozen weight (taken before DeepSpeed partitions them)."""
    digest, count, numel = hashlib.sha256(), 0, 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
        count, numel = count + 1, numel + param.numel()
    return {"tensors": count, "numel": numel, "sha256": digest.hexdigest()}


def run_identity(cfg, model: torch.nn.Module | None = None) -> dict:
    """What a checkpoint must match to be loaded into this run (the frozen weights: given a model)."""
    identity = {"mode": cfg.mode, "model": json.loads(json.dumps(to_plain(cfg.model)))}
    if model is not None:
        identity["frozen"] = frozen_fingerprint(model)
    return identity


def check_identity(saved: dict, current: dict, where: str) -> None:
    if saved["mode"] != current["mode"]:
        raise ConfigError(
            f"{where} was trained with mode={saved['mode']}, this run has mode={current['mode']}: "
            "resume or evaluate it with the same mode"
        )
    diffs = _differences(saved["model"], current["model"], "model")
    if diffs:
        raise ConfigError(
            f"{where} was trained with other towers or settings: {'; '.join(diffs[:6])}. "
            "Use the run's own config (its config.yaml) to load it"
        )
    if "frozen" in saved and "frozen" in current and saved["frozen"] != current["frozen"]:
        raise ConfigError(
            f"{where}: the frozen base weights differ from those the run started from "
            f"(sha256 {saved['frozen']['sha256'][:12]}... vs {current['frozen']['sha256'][:12]}...): "
            "the checkpoint holds only trained weights, so it needs the very same pretrained towers"
        )


def _differences(a, b, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [f"{path} was {a!r}, now {b!r}"]


# ---------------------------------------------------------------------------------- save
def _write_atomic(path: str, text: str) -> None:
    with atomic_path(path) as scratch, open(scratch, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _maybe_inject_fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"kill_in_save:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    engine, root: str, step: int, client_state: dict, meta: dict, rank: int, keep_only_latest: bool = False
) -> str:
    """Save on every rank; returns the final folder. Frozen weights and their (absent) states stay out."""
    tag = f"step{step}"
    partial = tag + PARTIAL
    if rank == 0:
        shutil.rmtree(os.path.join(root, partial), ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    barrier()
    engine.save_checkpoint(
        root, tag=partial, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rng_state(), os.path.join(root, partial, f"rng_rank{rank}.pt"))  # this rank's device only
    if rank == 0:
        with open(os.path.join(root, partial, META), "w") as f:
            json.dump(meta, f, indent=2)
    _maybe_inject_fault(step)
    barrier()  # every rank's files are complete
    if rank == 0:
        final = os.path.join(root, tag)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(os.path.join(root, partial), final)
        _write_atomic(os.path.join(root, LATEST), tag)
        if keep_only_latest:
            for name in os.listdir(root):
                if name != tag and name.startswith("step") and os.path.isdir(os.path.join(root, name)):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    return os.path.join(root, tag)


# ---------------------------------------------------------------------------------- find and load
def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A run folder, its ``checkpoints`` folder or one tag folder -> (checkpoints folder, tag)."""
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, META)):
        root, tag = os.path.split(os.path.abspath(path.rstrip("/")))
        return root, tag
    for root in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(root, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
            if not os.path.isfile(os.path.join(root, tag, META)):
                raise ConfigError(f"checkpoint {root}: 'latest' names {tag}, which is missing or incomplete")
            return root, tag
    raise ConfigError(
        f"{path} holds no lilt_ds checkpoint (no {META}, and no 'latest' in it or in "
        f"{os.path.join(path, 'checkpoints')})"
    )


def read_meta(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, META)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"checkpoint {os.path.join(root, tag)}: {META} is unreadable ({e}); the folder is corrupt"
        ) from None


def load_checkpoint(engine, root: str, tag: str, identity: dict, world_size: int, rank: int) -> dict:
    """Load into a fresh engine; returns the client state. Checks the run identity first.

    On another world size DeepSpeed's ZeRO optimizer partitions do not fit: the module weights are
    loaded, the optimizer state starts afresh (with a warning) and the schedule continues.
    """
    where = f"checkpoint {os.path.join(root, tag)}"
    meta = read_meta(root, tag)
    check_identity(meta["identity"], identity, where)
    same_world = meta["world_size"] == world_size
    if not same_world:
        log.warning(
            "%s was saved by %d rank(s), this run has %d: loading the trained weights only; "
            "the optimizer state (Adam moments) starts afresh",
            where,
            meta["world_size"],
            world_size,
        )
    try:
        path, client_state = engine.load_checkpoint(
            root,
            tag=tag,
            load_module_strict=False,
            load_optimizer_states=same_world,
            load_lr_scheduler_states=same_world,
            load_module_only=not same_world,
        )
    except Exception as e:  # noqa: BLE001 - a torn or foreign file surfaces deep inside torch.load
        raise ConfigError(
            f"{where} could not be loaded ({type(e).__name__}: {e}); it is corrupt or incomplete"
        ) from None
    if path is None:
        raise ConfigError(f"{where} could not be loaded by DeepSpeed")
    rng_file = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if same_world and os.path.isfile(rng_file):
        client_state["rng"] = torch.load(rng_file, weights_only=False)
    return client_state or meta["client_state"]
