"""Check a DeepSpeed hostfile before launching, with messages that name the line and the fix.

The launcher is DeepSpeed's (``deepspeed --hostfile H``); its own parser stops on a bad line with a
traceback. ``python launch/check_hostfile.py H`` (run by the launch/*.sh scripts) checks the same
format first: ``hostname slots=N`` per line, ``#`` comments, no host twice.
"""

from __future__ import annotations

import re

from .errors import ConfigError

LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")


def parse_hostfile(path: str) -> dict[str, int]:
    """``{hostname: slots}`` in file order."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"hostfile {path} cannot be read: {e.strerror}") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = LINE.match(line)
        if not match:
            raise ConfigError(
                f"hostfile {path}, line {number}: {raw!r} does not parse. Each line is 'hostname slots=N' "
                "(N GPUs on that node), e.g. 'worker-1 slots=4'; '#' starts a comment"
            )
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise ConfigError(f"hostfile {path}, line {number}: {host} has slots={slots}; give at least 1")
        if host in hosts:
            raise ConfigError(f"hostfile {path}, line {number}: {host} is listed twice; list each node once")
        hosts[host] = slots
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no node: add lines like 'worker-1 slots=4'")
    return hosts
