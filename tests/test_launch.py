"""The commands in launch/: both flag styles, and a user's mistake as `error: ...` with exit status 1
before any model or data is built, never a traceback."""

import os
import subprocess
import sys

import pytest

from tests.launchers import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_building(monkeypatch):
    """Any model or data built means the mistake was found too late."""
    import lilt_ds.models
    import lilt_ds.train

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was built before the mistake was reported")

    for module, name in ((lilt_ds.train, "build_model"), (lilt_ds.train, "build_train_loader"),
                         (lilt_ds.models, "build_model")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("override, message", [
    ("loss.type=clipp", "error: unknown loss type 'clipp'"),
    ("train.lr=fast", "error: train.lr = 'fast': expected a number > 0"),
    ("train.micro_batch_size=0", "error: train.micro_batch_size = 0: expected an integer >= 1"),
    ("loss.chunk_size=1024", "error: loss.chunk_size=1024 is an option of loss.type chunked or fused or siglip, not clip"),
])
def test_pretrain_refuses_a_bad_config_before_building_anything(no_building, override, message):
    cli = launcher("_cli")
    with pytest.raises(SystemExit) as stop:
        cli.run(launcher("pretrain").main, ["--config", "lilt", "--overrides", override])
    assert str(stop.value.code).startswith(message)


@pytest.mark.parametrize("override", ["loss.type=clipp", "train.lr=fast"])
def test_a_bad_config_exits_with_status_1_and_no_traceback(override):
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--overrides", override], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr


def test_every_long_flag_takes_both_spellings():
    cli = launcher("_cli")
    parser = cli.ArgumentParser(launcher=True)
    parser.add_argument("--output_dir")
    parser.add_argument("--micro-batch", type=int)
    args = parser.parse_args(["--output-dir", "a", "--micro_batch", "3", "--local-rank", "1"])
    assert (args.output_dir, args.micro_batch, args.local_rank) == ("a", 3, 1)


@pytest.mark.parametrize("name, argv, message", [
    ("evaluate", ["--task", "retrieval", "--data", "/no/such.json", "--config", "nope"], "unknown config preset 'nope'"),
    ("profile_memory", ["--gpu_memory", "32 bananas"], "GPU memory '32 bananas' does not parse"),
    ("summary", ["--overrides", "visionencoder=x"], "'visionencoder' in override 'visionencoder=x'. Closest valid keys: vision_encoder"),
    ("check_hostfile", ["/no/such/hostfile"], "/no/such/hostfile"),
    ("export", ["--checkpoint", "/no/such/run", "--out", "x.safetensors"], "checkpoint /no/such/run does not exist"),
    ("make_shards", ["--json", "/no/such.json", "--out", "/tmp/never"], "/no/such.json"),
])
def test_every_launcher_reports_a_mistake_as_an_error_line(name, argv, message):
    cli = launcher("_cli")
    with pytest.raises(SystemExit) as stop:
        cli.run(launcher(name).main, argv)
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)


def test_the_former_python_m_commands_say_where_they_went():
    result = subprocess.run([sys.executable, "-m", "lilt_ds.export", "--checkpoint", "x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "error: this command is now `python launch/export.py`" in result.stderr
