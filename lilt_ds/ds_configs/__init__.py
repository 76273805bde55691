"""The DeepSpeed configs that ship with the package, and the one lookup of ``--deepspeed_config``.

A value is a path when it names an existing file (``ds_configs/zero2.json`` from the checkout, or
any JSON file of yours); otherwise a bare name (``zero2`` or ``zero2.json``) is a file of this folder,
so commands find the shipped configs from any directory.
"""

from __future__ import annotations

import glob
import os

from ..errors import ConfigError

FOLDER = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The packaged configs, by name (``zero0``, ``zero2_offload``, ...)."""
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(FOLDER, "*.json")))


def ds_config_path(name_or_path: str | None) -> str | None:
    """The file ``name_or_path`` means: an existing file as is, else the packaged config of that name.
    Empty stays empty (the caller says none was given)."""
    if not name_or_path or os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path[: -len(".json")] if name_or_path.endswith(".json") else name_or_path
    if os.path.basename(name) == name and name in names():
        return os.path.join(FOLDER, name + ".json")
    raise ConfigError(
        f"ds_config {name_or_path} does not exist: pick one of ds_configs by name "
        f"({', '.join(names())}) or give the path of a JSON file"
    )
