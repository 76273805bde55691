"""The commands that ship with the package, one module each (``lilt-<name>`` console scripts,
``python -m lilt_ds.cli.<name>``, ``deepspeed --module lilt_ds.cli.pretrain``; launch/ keeps a
wrapper per command), and what they share: one flag style and one way of reporting a user's mistake.

Every long flag works as ``--x_y`` and as ``--x-y`` (DeepSpeed's launcher passes ``--local_rank``,
users type either). A :class:`lilt_ds.errors.LiltError` (a config key, a file, an argument, a run
that diverged) ends the command with ``error: ...`` and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse with both spellings of every long flag, and the launcher's ``--local_rank`` accepted."""

    def __init__(self, *args, launcher: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if launcher:
            self.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")

    def add_argument(self, *flags, **kwargs):
        spellings = list(flags)
        for flag in flags:
            if flag.startswith("--"):
                other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
                if other not in spellings:
                    spellings.append(other)
        return super().add_argument(*spellings, **kwargs)

    def add_ds_config_argument(self, **kwargs):
        """``--deepspeed_config``: a packaged name or a path (:func:`lilt_ds.ds_configs.ds_config_path`)."""
        from lilt_ds.ds_configs import names

        return self.add_argument(
            "--deepspeed_config",
            default="zero2",
            **kwargs,
            help=(
                "DeepSpeed JSON config (ZeRO stage, precision, offload, buckets): a packaged name "
                f"({', '.join(names())}) or a path (default zero2)"
            ),
        )


def run(main, argv=None) -> None:
    """``main(argv)``, a user's mistake reported as ``error: ...`` with exit status 1; a status that
    ``main`` returns (an int) is the exit status.

    With the process's own arguments (``argv`` None: a console script, ``python -m``, a launcher)
    the command owns the process: one that joined a process group ends through
    :func:`lilt_ds.runtime.end_process`.
    """
    from lilt_ds.errors import LiltError

    try:
        try:
            status = main(argv)
        except LiltError as e:
            sys.exit(f"error: {e}")
        if status:
            sys.exit(status)
    except SystemExit as e:
        if argv is None:
            _end(e.code)
        raise
    if argv is None:
        _end(0)


def _end(code) -> None:
    runtime = sys.modules.get("lilt_ds.runtime")  # loaded by every command that joins a group
    if runtime is not None:
        runtime.end_process(code)
