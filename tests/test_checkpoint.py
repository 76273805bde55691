"""Checkpoints with real DeepSpeed engines: frozen-free, exact resume after a real kill, atomic saves,
another world size, corrupt and foreign checkpoints."""

import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lilt_ds.checkpoint import FAULT_ENV
from tests.conftest import tiny_training_overrides
from tests.distributed import free_port
from tests.test_train import DEEPSPEED, ROOT, run


def args(output_dir, ds_config, extra=()):
    return [
        "launch/pretrain.py",
        "--deepspeed_config",
        ds_config,
        "--output_dir",
        str(output_dir),
        "--overrides",
        *tiny_training_overrides(output_dir, ["train.log_every=1", *extra]),
    ]


def step_losses(output_dir, key="loss"):
    """step -> every loss (or ``key``) logged for it (a resumed run logs again the steps after its checkpoint)."""
    losses = {}
    for line in (output_dir / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses.setdefault(record["step"], []).append(record[key])
    return losses


def launch_two_ranks(output_dir, ds_config, extra=(), extra_args=(), **popen):
    return subprocess.Popen(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            *args(output_dir, ds_config, extra),
            *extra_args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


SCHEDULE = ["train.max_steps=8", "checkpoint.every_steps=3", "train.epochs=20"]


@pytest.mark.slow
def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path, fp32_ds_configs):
    """ZeRO-3, the partitioned layout (ZeRO-2's two-rank resume: tests/test_preemption.py's requeue)."""
    ds = fp32_ds_configs[3]
    reference = launch_two_ranks(tmp_path / "reference", ds, SCHEDULE)
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = launch_two_ranks(interrupted, ds, SCHEDULE, start_new_session=True)
    start = time.time()
    while not (interrupted / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() - start < 300, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    killed_at = max(step_losses(interrupted))
    assert killed_at < 8, "the run finished before the kill; the test proves nothing"

    result = run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            *args(interrupted, ds, SCHEDULE),
            "--resume",
            "latest",
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout

    for key in ("loss", "logit_scale"):  # rank 0 reads the scale alone, also where ZeRO-3 partitions it
        expected, got = step_losses(tmp_path / "reference", key), step_losses(interrupted, key)
        assert sorted(got) == sorted(expected) == list(range(1, 9))
        for step, values in got.items():
            assert all(v == expected[step][0] and math.isfinite(v) for v in values), (key, step, values, expected)
    assert len({values[0] for values in got.values()}) > 1  # the scale trains: the value read is the live one


def single(output_dir, ds_config, extra=(), env=None, resume=None):
    cmd = [sys.executable, *args(output_dir, ds_config, extra)] + (["--resume", resume] if resume else [])
    return run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_save_leaves_latest_loadable(tmp_path):
    out, ds = tmp_path / "run", os.path.join(ROOT, "ds_configs", "zero2.json")
    killed = single(out, ds, ["train.max_steps=6", "checkpoint.every_steps=2"], env={FAULT_ENV: "kill_in_save:4"})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step4.partial").is_dir() and not (checkpoints / "step4").exists()
    assert (checkpoints / "latest").read_text() == "step2"
    resumed = single(out, ds, ["train.max_steps=6", "checkpoint.every_steps=2"], resume="latest")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert (checkpoints / "latest").read_text() == "step6" and not (checkpoints / "step4.partial").exists()


@pytest.mark.slow
def test_resume_on_two_ranks_from_a_one_rank_checkpoint(tmp_path):
    out, ds = tmp_path / "run", os.path.join(ROOT, "ds_configs", "zero2.json")
    first = single(out, ds, ["train.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    result = run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            *args(out, ds, ["train.max_steps=4"]),
            "--resume",
            "latest",
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "was saved by 1 rank(s), this run has 2: loading the trained weights only" in result.stdout
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step4"
    assert "trainable weights identical on all 2 rank(s)" in result.stdout


def checkpoint_files(folder):
    return [f for f in glob.glob(os.path.join(folder, "*.pt"))]


def tensors_in(obj, prefix=""):
    """(key path, tensor) of every tensor anywhere in a loaded checkpoint object."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{prefix}[{i}]")


@pytest.mark.slow
def test_lilt_checkpoint_is_a_small_fraction_of_clip_and_holds_no_frozen_tensor(tmp_path):
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model

    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    sizes = {}
    for mode, unlock in (("clip", "[]"), ("lilt", "[ln]")):
        out = tmp_path / mode
        extra = [f"mode={mode}", f"model.vision.unlock={unlock}", f"model.text.unlock={unlock}", "train.max_steps=1"]
        result = single(out, ds, extra)
        assert result.returncode == 0, result.stderr[-3000:]
        folder = out / "checkpoints" / "step1"
        sizes[mode] = sum(f.stat().st_size for f in folder.iterdir())
        if mode == "lilt":
            cfg = load_config(str(out / "config.yaml"))
            model = build_model(cfg, load_weights=False)
            frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            stored = 0
            for path in checkpoint_files(folder):
                for key, tensor in tensors_in(torch.load(path, map_location="cpu", weights_only=False)):
                    assert not any(key.endswith(name) for name in frozen), f"frozen {key} in {path}"
                    stored += tensor.numel()
            # module weights, fp32 master, 2 Adam moments (+ alignment padding): nothing of the frozen towers
            assert stored <= 5 * trainable, (stored, trainable)
            assert stored < sum(p.numel() for p in frozen.values()) / 10
    assert sizes["lilt"] <= 0.10 * sizes["clip"], sizes
    print(f"checkpoint bytes: {sizes}")


def _export_equals_trained(rank, world_size, tmp_dir, ds_config):
    import lilt_ds
    from lilt_ds.config import load_config
    from lilt_ds.train import Trainer

    cfg = load_config("lilt", tiny_training_overrides(tmp_dir, [f"output_dir={tmp_dir}/run", "train.max_steps=3"]))
    trainer = Trainer(cfg, ds_config)
    trainer.run()
    torch.manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 9)), torch.ones(4, 9, dtype=torch.long))
    trained = trainer.engine.module.eval()
    rebuilt = lilt_ds.load_exported(os.path.join(tmp_dir, "run", "trainable.safetensors"))
    with torch.no_grad():
        diffs = [(a - b).abs().max().item() for a, b in zip(trained(*batch), rebuilt(*batch))]
    return {"diffs": diffs, "loss_steps": trainer.step}


@pytest.mark.slow
def test_export_rebuilds_the_trained_model(tmp_path, fp32_ds_configs):
    from tests.distributed import run_ranks

    [result] = run_ranks(_export_equals_trained, 1, tmp_path, str(tmp_path), fp32_ds_configs[2])
    assert result["loss_steps"] == 3
    assert max(result["diffs"]) <= 1e-6, result
    export = tmp_path / "run" / "trainable.safetensors"
    cli = run(
        [
            sys.executable,
            "launch/export.py",
            "--checkpoint",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "again.safetensors"),
        ]
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(export)), load_file(str(tmp_path / "again.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bad_checkpoints_give_clear_errors(tmp_path):
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    missing = single(tmp_path / "a", ds, resume=str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and f"checkpoint {tmp_path / 'nowhere'} does not exist" in missing.stderr

    out = tmp_path / "run"
    assert single(out, ds, ["train.max_steps=1"]).returncode == 0
    other_mode = single(tmp_path / "b", ds, ["mode=lit", "model.text.unlock=[]"], resume=str(out))
    assert other_mode.returncode != 0 and "was trained with mode=lilt, this run has mode=lit" in other_mode.stderr
    other_towers = single(tmp_path / "c", ds, ["embed_dim=16"], resume=str(out))
    assert other_towers.returncode != 0 and "model.embed_dim was 32, now 16" in other_towers.stderr

    model_file = out / "checkpoints" / "step1" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    corrupt = single(tmp_path / "d", ds, resume=str(out))
    assert corrupt.returncode == 1 and f"{model_file} is unreadable (cut short or corrupt)" in corrupt.stderr
    for result in (missing, other_mode, other_towers, corrupt):
        assert "Traceback" not in result.stderr


def test_bad_sample_counts_survive_a_resume(tmp_path):
    """on_bad_sample=skip counts what it replaced; a resumed run goes on from those counts."""
    from lilt_ds.config import load_config
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer
    from tests.data.files import write_image, write_json
    from tests.test_train import _lilt_ds_logging_restored

    entries = [
        {"image": write_image(tmp_path / "images" / f"{i}.jpg", colour=(20 * i, 90, 160)), "caption": f"caption {i}"}
        for i in range(12)
    ]
    (tmp_path / "images" / "3.jpg").write_bytes(b"not a jpeg")
    train_json = write_json(tmp_path / "train.json", entries)
    cfg = load_config(
        "demo",
        tiny_training_overrides(
            tmp_path,
            [
                f"data.train_files=[{train_json}]",
                "data.on_bad_sample=skip",
                "data.max_bad_fraction=0.5",
                "eval.every_epochs=0",
                "train.max_steps=3",
            ],
        ),
    )
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    with process_group_scope(), _lilt_ds_logging_restored():
        cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "run"))
        first = Trainer(cfg, ds)
        first.run()
        counts = first.loader.dataset.bad_samples.state_dict()
        first.engine.destroy()
        assert counts["replaced"] >= 1 and counts["unreadable"] == [3]
        resumed = Trainer(cfg, ds, resume="latest")
        assert resumed.loader.dataset.bad_samples.state_dict() == counts
        resumed.engine.destroy()


def test_patch_dropout_resumes_with_the_same_patches(tmp_path, fp32_ds_configs):
    """The kept patches are drawn from the run's RNG, which a checkpoint restores: a run resumed at
    step 2 repeats steps 3 and 4 of the uninterrupted one bit for bit (step 2 is one where DeepSpeed's CPU
    Adam alone would not: its beta powers after a load come from pow(), not the run's products, unless replayed)."""
    from lilt_ds.config import load_config
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer
    from tests.test_train import _lilt_ds_logging_restored

    extra = [
        "model.vision.patch_dropout=0.5",
        "image_size=64",
        "data.demo={n: 48, eval_n: 12, seed: 0, size: 64}",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "eval.every_epochs=0",
        "train.epochs=20",
    ]
    losses = {}
    with process_group_scope(), _lilt_ds_logging_restored():
        for name, resume in (("run", None), ("resumed", str(tmp_path / "run" / "checkpoints" / "step2"))):
            cfg = load_config("demo", tiny_training_overrides(tmp_path, [*extra, f"output_dir={tmp_path / name}"]))
            trainer = Trainer(cfg, fp32_ds_configs[2], resume=resume, quiet=True)
            trainer.run()
            trainer.engine.destroy()
            losses[name] = {step: values[0] for step, values in step_losses(tmp_path / name).items()}
    assert sorted(losses["resumed"]) == [3, 4]
    assert [losses["resumed"][s] for s in (3, 4)] == [losses["run"][s] for s in (3, 4)]


@pytest.mark.slow
def test_keep_last_removes_older_checkpoints_and_a_kill_during_removal_leaves_a_resumable_folder(tmp_path):
    out, ds = tmp_path / "run", os.path.join(ROOT, "ds_configs", "zero2.json")
    schedule = ["train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]
    killed = single(out, ds, schedule, env={FAULT_ENV: "kill_in_removal:4"})
    assert killed.returncode == -signal.SIGKILL  # at step 4, while step2 was being removed
    checkpoints = out / "checkpoints"
    held = lambda: sorted(n for n in os.listdir(checkpoints) if n.startswith("step"))  # DeepSpeed adds a script
    assert held() == ["step2.removing", "step3", "step4"]
    assert (checkpoints / "latest").read_text() == "step4"
    resumed = single(out, ds, schedule, resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert held() == ["step5", "step6"]


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_names_its_file_and_auto_resume_falls_back(tmp_path):
    out, ds = tmp_path / "run", os.path.join(ROOT, "ds_configs", "zero2.json")
    schedule = ["train.max_steps=4", "checkpoint.every_steps=2"]
    assert single(out, ds, schedule).returncode == 0
    model_file = out / "checkpoints" / "step4" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # a disk that filled up

    explicit = single(out, ds, schedule, resume=str(out / "checkpoints" / "step4"))
    assert explicit.returncode == 1 and "Traceback" not in explicit.stderr
    assert f"{model_file} is unreadable" in explicit.stderr.splitlines()[-1]

    auto = single(out, ds, schedule, resume="auto")
    assert auto.returncode == 0, auto.stdout[-3000:] + auto.stderr[-3000:]
    assert f"skipping checkpoint step4: {model_file} cannot be read" in auto.stdout + auto.stderr
    assert "resumed from" in auto.stdout and "at step 2" in auto.stdout
