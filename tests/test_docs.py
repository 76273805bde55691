"""Every command the README and the docs show is one the programs accept: the deepspeed launcher's
flags as its own parser reads them, each command's and benchmark's flags as its parser reads them, and
every --config/--overrides as the config schema reads them (keys, types, ranges; files and towers are
not looked up: the docs' paths are the reader's). A flag renamed or a key moved fails here."""

import glob
import importlib
import os
import re
import shlex
import sys

import pytest

from lilt_ds.config import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PLACEHOLDERS = {"R": "0", "N": "2", "NAME": "lilt"}  # the docs' names for a number or a preset
SHELL_WORDS = {"until", "while", "do", "if", "then", "time"}


def shown_commands():
    """(page, command) for every line of a shell block and every inline span that starts a program."""
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if lang in ("bash", "sh", "console"):
                for line in body.replace("\\\n", " ").splitlines():
                    yield from ((page, part) for part in simple_commands(line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            yield from ((page, part) for part in simple_commands(span))


def simple_commands(line: str) -> list[str]:
    """The line's commands (split at && ; ||, shell keywords and leading VAR=value dropped)."""
    line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
    if "<" in line:  # a pattern (python -m lilt_ds.cli.<name>), not a command
        return []
    out = []
    for part in re.split(r"&&|\|\||;", line):
        words = part.split()
        while words and (words[0] in SHELL_WORDS or re.match(r"^[A-Z_]+=\S*$", words[0])):
            words = words[1:]
        if words:
            out.append(" ".join(words))
    return out


def program(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, name, arguments) of one of ours: ("cli", "pretrain", args), ("benchmark", "memory", args),
    or ("launcher", "deepspeed", args) for the deepspeed launcher in front of any script."""
    if tokens[0] == "deepspeed" and len(tokens) > 1:
        return "launcher", "deepspeed", tokens[1:]
    if tokens[0].startswith("lilt-"):
        return "cli", tokens[0][5:].replace("-", "_"), tokens[1:]
    if tokens[0] == "sbatch" and tokens[1:2] == ["launch/pretrain.sbatch"]:
        return "cli", "pretrain", tokens[2:]  # the batch script passes its arguments to pretrain.py
    if tokens[0] == "python" and len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("lilt_ds.cli."):
        return "cli", tokens[2].rsplit(".", 1)[1], tokens[3:]
    match = re.fullmatch(r"(launch|benchmarks)/(\w+)\.py", tokens[1]) if tokens[0] == "python" else None
    if match:
        return "cli" if match.group(1) == "launch" else "benchmark", match.group(2), tokens[2:]
    return None


def launched(arguments: list[str]) -> tuple[str, str, list[str]] | None:
    """The deepspeed launcher's flags read by its own parser; then the program it starts, if ours."""
    from deepspeed.launcher.runner import parse_args

    found = parse_args(arguments)
    if found.module:
        return program(["python", "-m", found.user_script, *found.user_args])
    return program(["python", found.user_script, *found.user_args])


class Parsed(Exception):
    def __init__(self, args):
        self.args_ = args


def stop_after_parse(monkeypatch) -> None:
    """Every argparse parser stops the program right after it parsed: nothing runs."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


COMMANDS = sorted({(page, command) for page, command in shown_commands()})
OURS = [(page, command) for page, command in COMMANDS if program(shlex.split(command)) is not None]


def test_the_docs_show_commands_of_every_kind():
    kinds = {program(shlex.split(command))[:2] for _, command in OURS}
    assert {("cli", "pretrain"), ("cli", "evaluate"), ("cli", "export"), ("benchmark", "gpu_check")} <= kinds


@pytest.mark.parametrize("page, command", OURS, ids=[f"{p}: {c[:60]}" for p, c in OURS])
def test_a_shown_command_parses(page, command, monkeypatch):
    kind, name, arguments = program(shlex.split(command))
    arguments = [PLACEHOLDERS.get(a, a) for a in arguments]
    assert not [a for a in arguments if a.startswith("[")], f"{page}: show a command, not a synopsis: {command}"
    if kind == "launcher":
        inner = launched(arguments)
        if inner is None:  # deepspeed in front of a script the docs leave open ("...")
            return
        kind, name, arguments = inner
    arguments = [a for a in arguments if a != "..."]  # "and the rest of the command"
    if kind == "cli":
        path = os.path.join(ROOT, "launch", f"{name}.py")
        assert os.path.isfile(path), f"{page}: no command {name}: {command}"
        main = importlib.import_module(f"lilt_ds.cli.{name}").main
    else:
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", f"{name}.py")), f"{page}: no benchmark {name}"
        main = importlib.import_module(name).main  # benchmarks/ is on the path (pyproject.toml), as for a script
    if kind == "cli" and not arguments and not command.endswith("..."):  # a command named in prose
        return
    monkeypatch.setattr(sys, "argv", [name, *arguments])
    stop_after_parse(monkeypatch)
    with pytest.raises(Parsed) as parsed:
        main()
    args = parsed.value.args_
    if getattr(args, "overrides", None) is not None and getattr(args, "config", None) is not None:
        parse_config(args.config, args.overrides)  # every key known, every value of its type
