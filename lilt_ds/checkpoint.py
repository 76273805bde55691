"""Checkpoints that hold only what trains, resume exactly, and are never half-written.

Layout of ``<output_dir>/checkpoints``::

    latest                  the tag of the newest complete checkpoint (replaced atomically)
    best, best.json         the tag with the best held-out metric and its value (checkpoint.keep_best)
    step200/                a DeepSpeed checkpoint folder, frozen parameters excluded, plus
        lilt_ds_meta.json   mode, model config, world size, frozen-weight fingerprint
        rng_rank{R}.pt      every RNG of rank R (Python, NumPy, torch, its own GPU's)
    step400.partial/        a save in progress (or killed): never picked by ``latest``
    step100.removing/       an old checkpoint being removed (``checkpoint.keep_last``): never picked

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
from .ds_compat import replay_cpu_adam_steps
from .errors import ConfigError
from .fileio import atomic_path
from .runtime import rng_state
from .schema import to_plain

log = logging.getLogger("lilt_ds")

LATEST = "latest"
BEST = "best"  # the tag of the checkpoint with the best held-out metric (checkpoint.keep_best)
PARTIAL = ".partial"
REMOVING = ".removing"
META = "lilt_ds_meta.json"
FAULT_ENV = "LILT_DS_FAULT_INJECT"  # "kill_in_save:<step>" / "kill_in_removal:<step>": SIGKILL mid-way (tests)


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


def _maybe_inject_fault(where: str, step: int) -> None:
    if os.environ.get(FAULT_ENV, "") == f"{where}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def step_of(tag: str) -> int | None:
    """``step200`` -> 200; None for anything else (a partial save, a folder being removed)."""
    number = tag[len("step") :] if tag.startswith("step") else ""
    return int(number) if number.isdigit() else None


def complete_checkpoints(root: str) -> list[str]:
    """Tags of the complete checkpoints in ``root`` (the folder holds its metadata), newest first."""
    if not os.path.isdir(root):
        return []
    tags = [
        name
        for name in os.listdir(root)
        if step_of(name) is not None and os.path.isfile(os.path.join(root, name, META))
    ]
    return sorted(tags, key=step_of, reverse=True)


def read_pointer(root: str, name: str) -> str | None:
    """The tag a pointer file of ``root`` (``latest``, ``best``) names, or None without one."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _pointed(root: str, name: str) -> str | None:
    """The tag a pointer file names, which must be a complete checkpoint; None without the pointer."""
    tag = read_pointer(root, name)
    if tag is not None and not os.path.isfile(os.path.join(root, tag, META)):
        raise ConfigError(f"checkpoint {root}: '{name}' names {tag}, which is missing or incomplete")
    return tag


def mark_best(root: str, tag: str, record: dict) -> None:
    """Point ``best`` at ``tag`` (atomic) and describe it in ``best.json`` (metric, value, step); rank 0."""
    _write_atomic(os.path.join(root, BEST + ".json"), json.dumps({"tag": tag, **record}, indent=2))
    _write_atomic(os.path.join(root, BEST), tag)


def remove_old_checkpoints(root: str, keep: int, step: int) -> list[str]:
    """Remove all but the newest ``keep`` complete checkpoints; returns the tags removed.

    Each folder is first renamed to ``<tag>.removing`` (atomic), then deleted: a kill in between leaves
    a folder no resume picks, removed by the next save; ``latest``, ``best`` and the newest ``keep`` are
    never touched.
    """
    for name in os.listdir(root):  # what an earlier removal left
        if name.endswith(REMOVING):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    removed, best = [], read_pointer(root, BEST)
    for tag in complete_checkpoints(root)[keep:]:
        if tag == best:
            continue
        doomed = os.path.join(root, tag + REMOVING)
        os.replace(os.path.join(root, tag), doomed)
        _maybe_inject_fault("kill_in_removal", step)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(tag)
    return removed


def save_checkpoint(
    engine, root: str, step: int, client_state: dict, meta: dict, rank: int, keep_last: int | None = None
) -> str:
    """Save on every rank; returns the final folder. Frozen weights and their (absent) states stay out.
    ``keep_last``: once the save is complete, remove all but the newest K complete checkpoints."""
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
    _maybe_inject_fault("kill_in_save", step)
    barrier()  # every rank's files are complete
    if rank == 0:
        final = os.path.join(root, tag)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(os.path.join(root, partial), final)
        _write_atomic(os.path.join(root, LATEST), tag)
        if keep_last is not None:
            removed = remove_old_checkpoints(root, keep_last, step)
            if removed:
                log.info("checkpoint.keep_last=%d: removed %s", keep_last, ", ".join(removed))
    barrier()
    return os.path.join(root, tag)


# ---------------------------------------------------------------------------------- find and load
def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A run folder, its ``checkpoints`` folder, one tag folder, or a pointer (``RUN/best``,
    ``RUN/checkpoints/best``, ``.../latest``) -> (checkpoints folder, tag)."""
    parent, name = os.path.split(os.path.abspath(path.rstrip("/")))
    if name in (BEST, LATEST) and not os.path.isdir(path):
        for root in (parent, os.path.join(parent, "checkpoints")):
            if (tag := _pointed(root, name)) is not None:
                return root, tag
        if name == BEST:
            raise ConfigError(
                f"checkpoint {path}: the run kept no best checkpoint (checkpoint.keep_best was not set, or no "
                "evaluation has run yet); give the run folder for its newest"
            )
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, META)):
        root, tag = os.path.split(os.path.abspath(path.rstrip("/")))
        return root, tag
    for root in (path, os.path.join(path, "checkpoints")):
        if (tag := _pointed(root, LATEST)) is not None:
            return root, tag
    raise ConfigError(
        f"{path} holds no lilt_ds checkpoint (no {META}, and no 'latest' in it or in "
        f"{os.path.join(path, 'checkpoints')})"
    )


def unreadable_file(folder: str) -> str | None:
    """The first file of a checkpoint folder that cannot be read whole (None: all can): the metadata
    must parse, and every torch file must be a complete archive (a file cut short by a full disk or a
    kill lacks the archive's directory at its end). Reads directories and metadata, not the tensors."""
    import zipfile

    try:
        with open(os.path.join(folder, META)) as f:
            json.load(f)
    except (OSError, json.JSONDecodeError):
        return os.path.join(folder, META)
    for parent, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(parent, name)
            if name.endswith(".pt"):
                try:
                    with zipfile.ZipFile(path):
                        pass
                except (OSError, zipfile.BadZipFile):
                    return path
    return None


def resume_candidates(resume: str | None, root: str) -> list[tuple[str, str]]:
    """What ``--resume`` names, as (checkpoints folder, tag) to try in order; ``root`` is the run's
    checkpoints folder.

    ``auto``: the complete checkpoints of ``root``, newest first, those with an unreadable file left
    out with a warning naming it; none (a first start): an empty list. ``latest``: ``root``'s newest.
    A path: that checkpoint, refused with an error naming the file that cannot be read.
    """
    if not resume:
        return []
    if resume == "auto":
        found = []
        for tag in complete_checkpoints(root):
            bad = unreadable_file(os.path.join(root, tag))
            if bad is None:
                found.append((root, tag))
            else:
                log.warning("--resume auto: skipping checkpoint %s: %s cannot be read (cut short?)", tag, bad)
        return found
    folder, tag = resolve_checkpoint(root if resume == "latest" else resume)
    bad = unreadable_file(os.path.join(folder, tag))
    if bad is not None:
        raise ConfigError(
            f"checkpoint {os.path.join(folder, tag)} cannot be loaded: {bad} is unreadable (cut short or "
            "corrupt); resume from an earlier checkpoint of the run, or use --resume auto to take the newest "
            "one that loads"
        )
    return [(folder, tag)]


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
    if same_world:  # CPU Adam's running beta powers as an uninterrupted run has them: an exact resume
        replay_cpu_adam_steps(engine.optimizer)
    rng_file = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if same_world and os.path.isfile(rng_file):
        client_state["rng"] = torch.load(rng_file, weights_only=False)
    return client_state or meta["client_state"]
