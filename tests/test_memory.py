import csv
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from lilt_ds.config import ConfigError, load_config
from lilt_ds.memory import (
    CATEGORIES,
    GIB,
    MIB,
    MODEL_STATES,
    EngineSettings,
    Measurement,
    MemoryModel,
    ParameterInventory,
    SavedTensorMeter,
    loss_buffer_bytes,
    model_state_bytes,
    parse_memory_size,
    profile_activations,
)
from lilt_ds.runtime import GPU_TARGET, DeviceFacts
from lilt_ds.tools.memory_report import ProfileRequest, comparison_rows, run_profile
from tests.conftest import tiny_overrides
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLOCKS = {"clip": ((), ()), "lit": ((), ()), "lilt": (("ln", "adapters"), ("ln", "bitfit"))}
CHECKPOINTING = ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true"]


def ds_config(name: str) -> str:
    return os.path.join(ROOT, "ds_configs", f"{name}.json")


def tiny(mode: str, extra=()):
    return load_config("lilt", tiny_overrides(mode, *UNLOCKS[mode], extra=list(extra)))


def test_gpu_sizes_parse_and_nonsense_is_refused():
    assert parse_memory_size("32GB") == 32 * GIB  # GPU makers' GB: a 32GB V100 holds 32 GiB
    assert parse_memory_size("80GiB") == parse_memory_size("80g") == 80 * GIB
    assert parse_memory_size("24000MB") == 24000 * 2**20
    assert parse_memory_size(" 1.5 TB ") == int(1.5 * 2**40)
    for bad in ("32", "lots", "-3GB", "0GB", "32XB", "", "GB"):
        with pytest.raises(ConfigError, match="does not parse: write a size with a unit"):
            parse_memory_size(bad)


def test_bad_world_size_and_missing_ds_config_are_config_errors(tmp_path):
    for world_size in (0, -2):
        with pytest.raises(ConfigError, match="world size must be a positive integer"):
            EngineSettings.from_ds_config({}, world_size)
        with pytest.raises(ConfigError, match="--world-size must be a positive integer"):
            ProfileRequest(world_size=world_size).check()
    with pytest.raises(ConfigError, match=r"ds_config .*nope\.json does not exist"):
        run_profile(ProfileRequest(ds_config=str(tmp_path / "nope.json")))
    with pytest.raises(ConfigError, match="unknown ZeRO stage 5"):
        EngineSettings.from_ds_config({"zero_optimization": {"stage": 5}}, 1)


def test_bytes_per_parameter_follow_the_zero_stage_and_frozen_ones_cost_their_weight_once():
    # even sizes, no padding: the reference figures of 16 bytes per trainable parameter, 2 per frozen one
    trainable, frozen, W = 8_000_000, 6_000_000, 4
    inventory = ParameterInventory(((2_000_000,) * 4,), (3_000_000,) * 2)
    expected = {0: 16, 1: 4 + 12 / W, 2: 2 + 14 / W, 3: 16 / W}
    for stage, per_parameter in expected.items():
        settings = EngineSettings.from_ds_config(
            {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}},
            W,
        )
        states = model_state_bytes(inventory, settings, rank=0).gpu
        assert sum(states[c] for c in MODEL_STATES) - states["frozen_weights"] == trainable * per_parameter, stage
        assert states["frozen_weights"] == frozen * 2 / (W if stage == 3 else 1), stage
    offload = EngineSettings.from_ds_config(
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, W
    )
    tally = model_state_bytes(inventory, offload, rank=0)
    assert tally.gpu["master_weights"] == tally.gpu["optimizer_states"] == 0
    assert tally.offloaded["optimizer_states"] == trainable * 8 / W


def test_saved_tensor_meter_counts_each_storage_once_and_skips_parameters():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    with SavedTensorMeter(layer.parameters()) as meter:
        y = layer(x)  # saves x (the weight is a parameter)
        z = (y * y).sum()  # saves y twice: one storage
        w = (x.t() * 2).sum()  # a view of x: no new storage, and 2 is not saved
    assert meter.bytes == 5 * 4 * 4 + 5 * 3 * 4
    (z + w).backward()


def test_activations_are_linear_in_the_batch_and_checkpointing_keeps_little():
    cfg = tiny("lilt")
    two, six = (profile_activations(cfg, torch.bfloat16, batch) for batch in (2, 6))
    assert two.bytes_per_sample() == pytest.approx(six.bytes_per_sample(), rel=0.01)
    per_sample = {mode: profile_activations(tiny(mode), torch.bfloat16, 2).bytes_per_sample() for mode in UNLOCKS}
    assert per_sample["lit"] < per_sample["lilt"] < per_sample["clip"]  # a fully locked tower keeps nothing
    checkpointed = profile_activations(tiny("lilt", CHECKPOINTING), torch.bfloat16, 2)
    assert checkpointed.bytes_per_sample() < 0.25 * two.bytes_per_sample()
    assert two.bytes_per_sample(zero3_linear=True) > two.bytes_per_sample()  # frozen linears keep their inputs


def test_patch_dropout_is_counted_in_the_activations():
    """Half the patches dropped: the clip model's activations shrink by most of the vision tower's share."""
    sizes = ["image_size=64"]  # 16 patches, so that dropping half of them shows
    full = profile_activations(tiny("clip", sizes), torch.bfloat16, 2).bytes_per_sample()
    dropped = profile_activations(tiny("clip", [*sizes, "model.vision.patch_dropout=0.5"]), torch.bfloat16, 2)
    text_only = profile_activations(tiny("lit", sizes), torch.bfloat16, 2).bytes_per_sample()  # vision keeps nothing
    vision = full - text_only
    assert dropped.bytes_per_sample() - text_only < 0.65 * vision


def test_the_fused_loss_is_costed_like_the_chunked_one_not_as_full_logits():
    """Both save features and row log-sum-exps only (and the fused one falls back to chunked)."""
    fused = loss_buffer_bytes({"type": "fused"}, 2048, 8, 256)
    assert fused == loss_buffer_bytes({"type": "chunked"}, 2048, 8, 256)
    assert fused < 0.15 * loss_buffer_bytes({"type": "clip"}, 2048, 8, 256)  # 36 MiB against 296 MiB at N = 16k
    blockwise = loss_buffer_bytes({"type": "siglip", "chunk_size": 4096}, 2048, 8, 256)  # 16k gathered > 4096
    assert blockwise < 0.15 * loss_buffer_bytes({"type": "siglip", "chunk_size": 2**20}, 2048, 8, 256)


def test_auto_device_choices_of_the_shipped_configs_are_made_for_the_machine_estimated():
    """zero2.json leaves bf16 and overlap_comm on "auto": for a GPU (the estimate's default) bf16 and two
    reduce buckets; for a CPU without bf16 instructions fp32 and one bucket."""
    from lilt_ds.engine import load_ds_config

    ds = load_ds_config(ds_config("zero2"))
    assert ds["bf16"]["enabled"] == "auto" and ds["zero_optimization"]["overlap_comm"] == "auto"
    gpu = EngineSettings.from_ds_config(ds, 4)
    assert (gpu.dtype, gpu.overlap_comm) == (torch.bfloat16, True) and gpu == EngineSettings.from_ds_config(
        ds, 4, GPU_TARGET
    )
    cpu = EngineSettings.from_ds_config(ds, 4, DeviceFacts("cpu", "cpu", False, "no bf16 instructions"))
    assert (cpu.dtype, cpu.overlap_comm) == (torch.float32, False)
    inventory = ParameterInventory(((10_000_000,), (1000,)), ())
    gpu_buckets = model_state_bytes(inventory, gpu).gpu["buckets"]
    assert gpu_buckets == 2 * 50_000_000 * 2  # two bf16 reduce buckets of reduce_bucket_size
    assert model_state_bytes(inventory, cpu).gpu["buckets"] == 50_000_000 * 4  # one fp32 bucket


def test_gpu_comparison_puts_like_beside_like_and_shows_what_the_peak_holds_beyond():
    cfg = tiny("lilt")
    from lilt_ds.engine import load_ds_config

    memory = MemoryModel(cfg, load_ds_config(ds_config("zero2")), 1)
    estimate = memory.estimate(4)
    measured_bytes = {c: estimate.total(c) for c in CATEGORIES} | {"other": 0}
    categories = sum(measured_bytes[c] for c in CATEGORIES)
    measured = Measurement(
        "cuda:0", 1, 4, measured_bytes, peak_allocated=categories + 100 * MIB, peak_reserved=categories + 150 * MIB
    )
    rows = {r["quantity"]: r for r in comparison_rows(estimate, measured)}
    assert rows["all categories"]["error_percent"] == 0.0 and rows["model states"]["error_percent"] == 0.0
    peak = next(r for q, r in rows.items() if q.startswith("GPU peak allocated (max_memory_allocated)"))
    assert peak["estimate"] is None and peak["error_percent"] is None  # not compared with the categories' sum
    assert "activation gradients" in next(q for q in rows if q.startswith("GPU peak allocated ("))
    assert rows["GPU peak allocated beyond the measured categories (for the headroom)"]["measured"] == 100 * MIB


def test_largest_micro_batch_is_the_last_one_under_the_budget():
    memory = MemoryModel(tiny("lilt"), {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 4)
    budget = memory.estimate(16).gpu_total
    estimate = memory.estimate(16, budget)
    assert estimate.fits and estimate.largest_micro_batch == 16
    assert not memory.estimate(17, budget).fits
    assert memory.largest_micro_batch(memory.estimate(1).gpu_total - 1) == 0


def test_the_micro_batch_chart_draws_every_ds_config_and_model_from_the_estimates(tmp_path):
    from lilt_ds.engine import load_ds_config
    from lilt_ds.tools.memory_report import plot_micro_batch_curves

    batches = [4, 8, 16, 32]
    curves = {
        name: {
            mode: [
                (b, MemoryModel(tiny(mode), load_ds_config(ds_config(name)), 4).estimate(b).gpu_total / GIB)
                for b in batches
            ]
            for mode in ("clip", "lilt")
        }
        for name in ("zero2", "zero3")
    }
    path = plot_micro_batch_curves(curves, 0.5, str(tmp_path / "by-micro-batch.png"), "tiny/tiny")
    image = Image.open(path)
    assert image.size == (1000, 400) and len(set(image.convert("L").getdata())) > 10  # two panels, drawn
    assert curves["zero3"]["clip"][-1][1] < curves["zero2"]["clip"][-1][1]  # ZeRO-3 partitions the weights
    assert all(a[1] < b[1] for a, b in zip(curves["zero2"]["lilt"], curves["zero2"]["lilt"][1:]))  # grows with batch


# -------------------------------------------------------------------------------- real engines
CASES = [  # (mode, ds_config, extra overrides): clip/lilt x ZeRO 0/2/3, lit; ZeRO-1, offload, global loss, ckpt
    *((mode, stage, ()) for mode in ("clip", "lilt") for stage in ("zero0", "zero2", "zero3")),
    ("lit", "zero2", ()),  # a locked tower's layout per stage is lilt's (frozen parameters), its activations its own
    ("lilt", "zero1", ("loss.local_loss=false",)),
    ("lilt", "zero2", ("loss.type=fused",)),
    ("lilt", "zero2_offload", ()),
    ("lilt", "zero3_offload", tuple(CHECKPOINTING)),
]
MICRO_BATCH = 6


def _estimate_and_measure(rank, world_size, cases):
    from lilt_ds.engine import load_ds_config
    from lilt_ds.memory import measure_training_memory
    from lilt_ds.runtime import present_device  # the ds_configs' "auto" choices of the machine measured

    results = []
    for mode, name, extra in cases:
        cfg, ds = tiny(mode, extra), load_ds_config(ds_config(name))
        estimate = MemoryModel(cfg, ds, world_size, device=present_device()).estimate(MICRO_BATCH, rank=rank)
        measured = measure_training_memory(cfg, ds, MICRO_BATCH)
        results.append(
            {
                "case": f"{mode} {name} {' '.join(extra)}",
                "measured": measured.bytes,
                "estimate": {c: estimate.total(c) for c in CATEGORIES},
            }
        )
        torch.distributed.barrier()
    return results


def test_estimate_matches_what_a_real_engine_holds_in_one_process():
    """The fast tier's measurement: one lilt engine, ZeRO-2, a world of one (two ranks: the test below)."""
    from lilt_ds.engine import load_ds_config
    from lilt_ds.memory import measure_training_memory
    from lilt_ds.runtime import present_device, process_group_scope

    cfg, ds = tiny("lilt"), load_ds_config(ds_config("zero2"))
    with process_group_scope():
        measured = measure_training_memory(cfg, ds, MICRO_BATCH)
        estimate = MemoryModel(cfg, ds, 1, device=present_device()).estimate(MICRO_BATCH, rank=0)
    for category in MODEL_STATES:
        assert estimate.total(category) == measured.bytes[category], category
    assert estimate.total("activations") == pytest.approx(measured.bytes["activations"], rel=0.10)


@pytest.mark.slow
def test_estimate_matches_what_real_engines_hold_on_two_ranks(tmp_path):
    per_rank = run_ranks(_estimate_and_measure, 2, tmp_path, CASES)
    for rank, results in enumerate(per_rank):
        for r in results:
            estimate, measured = r["estimate"], r["measured"]
            for category in MODEL_STATES:  # exactly the engine's tensors, padding included
                assert estimate[category] == measured[category], (rank, r["case"], category, estimate, measured)
            for category in ("activations", "loss_buffers"):
                assert estimate[category] == pytest.approx(measured[category], rel=0.10), (rank, r["case"], category)
            assert measured["other"] < 4096, r["case"]  # nothing sizeable escapes the categories
    lilt = {r["case"]: r["measured"] for r in per_rank[0] if r["case"].startswith("lilt")}
    assert lilt["lilt zero3 "]["activations"] > 1.2 * lilt["lilt zero2 "]["activations"]  # ZeRO-3's F.linear
    assert (
        lilt[f"lilt zero3_offload {' '.join(CHECKPOINTING)}"]["activations"] < 0.25 * lilt["lilt zero2 "]["activations"]
    )
    clip = {r["case"]: r["measured"] for r in per_rank[0] if r["case"].startswith("clip")}
    assert clip["clip zero3 "]["optimizer_states"] == pytest.approx(
        clip["clip zero0 "]["optimizer_states"] / 2, rel=0.01
    )


# -------------------------------------------------------------------------------- the command
def _profile_memory(*args, timeout=300):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "profile_memory.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_profile_memory_command_estimates_measures_and_writes_tables_and_chart(tmp_path):
    out = tmp_path / "memory"
    result = _profile_memory(
        "--config",
        "lilt",
        "--overrides",
        *tiny_overrides("lilt", ["ln", "adapters"]),
        "--deepspeed_config",
        ds_config("zero2"),
        "--micro-batch",
        "4",
        "--gpu-memory",
        "1GB",
        "--measure",
        "--output_dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verdict: fits in 1GB" in result.stdout and "| model states |" in result.stdout
    assert {p.name for p in out.iterdir()} == {
        "estimate.md",
        "estimate.csv",
        "estimate.png",
        "measured.md",
        "measured.csv",
    }
    with open(out / "estimate.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["fits"] == "True" and int(row["largest_micro_batch"]) > 4 and row["zero"] == "ZeRO-2"
    with open(out / "measured.csv") as f:
        measured = {r["quantity"]: r for r in csv.DictReader(f)}
    assert float(measured["model states"]["error_percent"]) == 0.0
    assert abs(float(measured["activations"]["error_percent"])) < 10
    assert (out / "estimate.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu-memory", "32 bananas"], "GPU memory '32 bananas' does not parse"),
        (["--world-size", "0"], "--world-size must be a positive integer, got 0"),
        (["--deepspeed_config", "ds_configs/zero9.json"], "ds_config ds_configs/zero9.json does not exist"),
    ],
)
def test_profile_memory_command_rejects_bad_input_without_traceback(args, message):
    result = _profile_memory("--config", "lilt", *args, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
