"""Mistakes a user can make and fix: one base class, so every entry point can turn them into
``error: ...`` and exit status 1 instead of a traceback, while bugs still show theirs."""

from __future__ import annotations


class LiltError(Exception):
    """A user's mistake (a config key, a file, a command line, a run that diverged): the message says
    what is wrong and how to fix it."""


class ConfigError(LiltError, ValueError):
    """A config the user wrote (preset, file, override, ds_config or argument) that cannot be used as is."""
