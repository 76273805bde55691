"""The three modes: which towers each locks, and what a locked tower's unlock set may say in each."""

from __future__ import annotations

from ..errors import ConfigError

MODES = ("clip", "lit", "lilt")
LOCKED_TOWERS = {"clip": (), "lit": ("vision",), "lilt": ("vision", "text")}
"""Which towers each mode locks; a locked tower trains only its ``unlock`` set."""


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def is_locked(mode: str, kind: str) -> bool:
    return kind in LOCKED_TOWERS[check_mode(mode)]


def is_fully_locked(mode: str, kind: str, unlock) -> bool:
    """A locked tower that unlocks nothing trains nothing: it runs under no_grad, keeping no activations."""
    return is_locked(mode, kind) and not list(unlock or [])


def check_unlock_for_mode(mode: str, kind: str, unlock) -> None:
    """An unlock set on a tower the mode trains whole is a mistake, not a no-op."""
    unlock = list(unlock or [])
    if unlock and not is_locked(mode, kind):
        raise ConfigError(
            f"mode={mode} trains the whole {kind} tower, so model.{kind}.unlock={unlock} "
            f"has no effect: set it to [] or use mode=lilt (or lit for a locked image tower)"
        )


def check_checkpointing(mode: str, kind: str, tower_cfg) -> None:
    """Activation checkpointing of a tower that keeps no activations (fully locked) is a mistake."""
    if tower_cfg.grad_checkpointing and is_fully_locked(mode, kind, tower_cfg.unlock):
        raise ConfigError(
            f"model.{kind}.grad_checkpointing is on, but the tower is fully locked and keeps "
            "no activations anyway: turn it off"
        )
