"""The commands (lilt_ds.cli): both flag styles, and a user's mistake as `error: ...` with exit status 1
before any model or data is built, never a traceback; the console scripts from any directory, and
launch/'s wrappers."""

import ast
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile

import pytest

from lilt_ds.cli import ArgumentParser, run
from lilt_ds.cli.pretrain import main as pretrain
from lilt_ds.ds_configs import names
from tests.conftest import tiny_training_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = sorted(
    name[:-3]
    for name in os.listdir(os.path.join(ROOT, "lilt_ds", "cli"))
    if name != "__init__.py" and name.endswith(".py")
)
SCRIPTS = os.path.dirname(sys.executable)  # where pip put the console scripts of this environment


@pytest.fixture
def no_building(monkeypatch):
    """Any model or data built means the mistake was found too late."""
    import lilt_ds.models
    import lilt_ds.train

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was built before the mistake was reported")

    for module, name in (
        (lilt_ds.train, "build_model"),
        (lilt_ds.train, "build_train_loader"),
        (lilt_ds.models, "build_model"),
    ):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.type=clipp", "error: unknown loss type 'clipp'"),
        ("train.lr=fast", "error: train.lr = 'fast': expected a number > 0"),
        ("train.micro_batch_size=0", "error: train.micro_batch_size = 0: expected an integer >= 1"),
        (
            "loss.chunk_size=1024",
            "error: loss.chunk_size=1024 is an option of loss.type chunked or fused or siglip, not clip",
        ),
    ],
)
def test_pretrain_refuses_a_bad_config_before_building_anything(no_building, override, message):
    with pytest.raises(SystemExit) as stop:
        run(pretrain, ["--config", "lilt", "--overrides", override])
    assert str(stop.value.code).startswith(message)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, override", [("launch/pretrain.py", "loss.type=clipp"), ("-m lilt_ds.cli.pretrain", "train.lr=fast")]
)
def test_a_bad_config_exits_with_status_1_and_no_traceback(command, override, tmp_path):
    """The checkout's wrapper from the checkout; the module from anywhere."""
    cwd = ROOT if command.startswith("launch/") else tmp_path
    result = subprocess.run(
        [sys.executable, *command.split(), "--overrides", override],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr


def test_every_long_flag_takes_both_spellings():
    parser = ArgumentParser(launcher=True)
    parser.add_argument("--output_dir")
    parser.add_argument("--micro-batch", type=int)
    args = parser.parse_args(["--output-dir", "a", "--micro_batch", "3", "--local-rank", "1"])
    assert (args.output_dir, args.micro_batch, args.local_rank) == ("a", 3, 1)


@pytest.mark.parametrize(
    "name, argv, message",
    [
        (
            "evaluate",
            ["--task", "retrieval", "--data", "/no/such.json", "--config", "nope"],
            "unknown config preset 'nope'",
        ),
        ("profile_memory", ["--gpu_memory", "32 bananas"], "GPU memory '32 bananas' does not parse"),
        (
            "summary",
            ["--overrides", "visionencoder=x"],
            "'visionencoder' in override 'visionencoder=x'. Closest valid keys: vision_encoder",
        ),
        ("check_hostfile", ["/no/such/hostfile"], "/no/such/hostfile"),
        (
            "export",
            ["--checkpoint", "/no/such/run", "--out", "x.safetensors"],
            "checkpoint /no/such/run does not exist",
        ),
        ("make_shards", ["--json", "/no/such.json", "--out", "/tmp/never"], "/no/such.json"),
        ("plot_run", ["/no/such/run"], "/no/such/run has no steps.jsonl: give a run's output_dir"),
    ],
)
def test_every_command_reports_a_mistake_as_an_error_line(name, argv, message):
    with pytest.raises(SystemExit) as stop:
        run(importlib.import_module(f"lilt_ds.cli.{name}").main, argv)
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)


def test_launch_keeps_a_wrapper_without_logic_and_a_console_script_for_every_command():
    wrappers = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "launch")) if name.endswith(".py"))
    assert wrappers == COMMANDS
    for name in COMMANDS:  # a docstring, two imports and the call: no logic of its own
        with open(os.path.join(ROOT, "launch", f"{name}.py")) as f:
            tree = ast.parse(f.read())
        body = tree.body[1:] if ast.get_docstring(tree) else tree.body
        assert [ast.unparse(node) for node in body] == [
            "from lilt_ds.cli import run",
            f"from lilt_ds.cli.{name} import main",
            "if __name__ == '__main__':\n    run(main)",
        ], name
    for name in COMMANDS:  # installed by pip install -e . (after adding a command: install again)
        with open(os.path.join(SCRIPTS, f"lilt-{name.replace('_', '-')}")) as f:
            assert f"from lilt_ds.cli.{name} import entry" in f.read(), name


@pytest.mark.slow
def test_a_wheel_ships_the_ds_configs_and_a_console_script_per_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lilt_ds-*.whl")
    archive = zipfile.ZipFile(wheel)
    shipped = {
        os.path.basename(n)[:-5]
        for n in archive.namelist()
        if n.startswith("lilt_ds/ds_configs/") and n.endswith(".json")
    }
    assert shipped == set(names())
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    scripts = dict(line.split(" = ") for line in archive.read(entry_points).decode().splitlines() if " = " in line)
    assert scripts == {f"lilt-{name.replace('_', '-')}": f"lilt_ds.cli.{name}:entry" for name in COMMANDS}
    archive.extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "from lilt_ds.ds_configs import ds_config_path; print(ds_config_path('zero2'))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert found.stdout.strip() == str(tmp_path / "site" / "lilt_ds" / "ds_configs" / "zero2.json"), found.stderr


@pytest.mark.slow
def test_a_console_script_runs_from_any_directory(tmp_path):
    result = subprocess.run(
        [os.path.join(SCRIPTS, "lilt-summary"), "--config", "lilt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config lilt: mode=lilt" in result.stdout and result.stdout.splitlines()[-1].startswith("total")
    bad = subprocess.run(
        [os.path.join(SCRIPTS, "lilt-check-hostfile"), str(tmp_path / "nope")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: hostfile") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_lilt_pretrain_trains_from_any_directory_with_a_packaged_ds_config_name(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            os.path.join(SCRIPTS, "lilt-pretrain"),
            "--deepspeed_config",
            "zero2",
            "--output_dir",
            str(out),
            "--overrides",
            *tiny_training_overrides(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "ds_configs")  # the name, not a folder here
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert json.loads((out / "results.jsonl").read_text().splitlines()[-1])["step"] == 2


ENDS_IN_A_GROUP = """
import atexit, os, sys
from lilt_ds.cli import run
from lilt_ds.errors import ConfigError
from lilt_ds.runtime import init_distributed, process_group_scope


class Finalized:
    def __del__(self, write=os.write):  # sys.stderr, even the module's globals, may be gone by then
        write(2, b"finalized")


kept = Finalized()  # collected at interpreter finalization, the step a joined process skips


def main(argv):
    atexit.register(print, "atexit ran")
    with process_group_scope():
        init_distributed()
    print("unflushed", end="")
    {ending}


run(main)
"""


@pytest.mark.parametrize(
    "ending, status, stderr",
    [("return 75", 75, ""), ("raise ConfigError('train.lr = -1: expected a number > 0')", 1, "error: train.lr = -1")],
)
def test_a_command_that_joined_a_group_keeps_its_status_and_output_and_skips_finalization(
    tmp_path, ending, status, stderr
):
    script = tmp_path / "command.py"
    script.write_text(ENDS_IN_A_GROUP.replace("{ending}", ending))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == status, result.stderr[-2000:]
    assert result.stdout.endswith("unflushedatexit ran\n")
    assert stderr in result.stderr and "finalized" not in result.stderr and "Traceback" not in result.stderr
