import glob
import json
import math
import os

import pytest
import torch

from lilt_ds.config import ConfigError, load_config
from lilt_ds.engine import engine_dtype, load_ds_config, param_groups, resolve_device_choices, resolve_ds_config
from lilt_ds.models import build_model
from lilt_ds.runtime import DeviceFacts
from tests.conftest import tiny_overrides, tiny_training_overrides
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_auto_values_are_filled_from_the_experiment_config():
    cfg = load_config(
        "lilt",
        [
            "train.micro_batch_size=16",
            "train.grad_accum_steps=2",
            "train.lr=2e-4",
            "train.min_lr=2e-5",
            "train.warmup_steps=50",
            "train.grad_clip=0.5",
        ],
    )
    ds = resolve_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json")), cfg, 4, 1000)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.02
    sched = ds["scheduler"]["params"]
    assert sched["total_num_steps"] == 1000 and sched["warmup_num_steps"] == 50
    assert sched["warmup_min_ratio"] == pytest.approx(0.1) and sched["cos_min_ratio"] == pytest.approx(0.1)
    assert "auto" not in json.dumps(ds)


NO_BF16_CPU = DeviceFacts("cpu", "cpu", False, "this CPU has no AVX512-BF16, AMX or Arm BF16 instructions")
BF16_GPU = DeviceFacts("cuda", "NVIDIA H100 80GB HBM3", True, "compute capability 9.0")
OLD_GPU = DeviceFacts("cuda", "Tesla V100-SXM2-32GB", False, "compute capability 7.0")


@pytest.mark.parametrize(
    "device, bf16, overlap", [(NO_BF16_CPU, False, False), (BF16_GPU, True, True), (OLD_GPU, False, True)]
)
def test_auto_precision_and_overlap_follow_the_device(device, bf16, overlap, caplog):
    """bf16 where the device computes it natively, fp32 elsewhere; overlap_comm on GPUs; one log line each."""
    import logging

    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    with caplog.at_level(logging.INFO, logger="lilt_ds"):
        resolved = resolve_ds_config(ds, load_config("lilt"), 2, 100, "zero2.json", device=device)
    assert resolved["bf16"]["enabled"] is bf16 and resolved["zero_optimization"]["overlap_comm"] is overlap
    assert engine_dtype(resolved) == (torch.bfloat16 if bf16 else torch.float32)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"precision {'bf16' if bf16 else 'fp32'} (ds_config zero2.json: bf16.enabled=auto; {device.reason})",
        f"overlap_comm {'on' if overlap else 'off'} (ds_config zero2.json: zero_optimization.overlap_comm="
        f"auto on {'a GPU' if overlap else 'the CPU'})",
    ]


@pytest.mark.parametrize("explicit", [True, False])
def test_explicit_precision_and_overlap_are_obeyed(explicit):
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds["bf16"]["enabled"], ds["zero_optimization"]["overlap_comm"] = explicit, explicit
    for device in (NO_BF16_CPU, BF16_GPU):
        resolved, notes = resolve_device_choices(ds, device)
        assert resolved["bf16"]["enabled"] is explicit and resolved["zero_optimization"]["overlap_comm"] is explicit
        assert notes == []


def test_every_shipped_bf16_config_leaves_precision_to_the_device():
    for path in DS_CONFIGS:
        ds = load_ds_config(path)
        if "fp16" not in ds:
            assert ds["bf16"]["enabled"] == "auto", path
        if ds["zero_optimization"]["stage"] in (2, 3):
            assert ds["zero_optimization"]["overlap_comm"] == "auto", path


def test_absent_blocks_are_filled_too():
    ds = resolve_ds_config({"zero_optimization": {"stage": 1}}, load_config("lilt"), 1, 10)
    assert ds["optimizer"]["type"] == "AdamW" and ds["scheduler"]["params"]["total_num_steps"] == 10
    assert ds["gradient_clipping"] == 1.0  # explicit: DeepSpeed's own default changed between releases


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "train_micro_batch_size_per_gpu",
            64,
            r"train_micro_batch_size_per_gpu=64 but the experiment config gives train\.micro_batch_size=128",
        ),
        ("train_batch_size", 100, r"train_batch_size=100 but the experiment config gives train\.micro_batch_size x"),
        ("gradient_accumulation_steps", 4, r"gradient_accumulation_steps=4 .* train\.grad_accum_steps=1"),
    ],
)
def test_contradicting_explicit_values_are_refused_naming_both(key, value, message):
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds[key] = value
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(ds, load_config("lilt"), 2, 100, "mine.json")


def test_matching_explicit_values_are_accepted():
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds.update(train_micro_batch_size_per_gpu=128, train_batch_size=256)
    ds["optimizer"]["params"]["lr"] = 1e-4
    assert resolve_ds_config(ds, load_config("lilt"), 2, 100)["train_batch_size"] == 256


def test_bad_ds_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"ds_config .*nope\.json does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_ds_config(str(broken))
    with pytest.raises(ConfigError, match=r"unknown ZeRO stage 4 .*use 0, 1, 2 or 3"):
        resolve_ds_config({"zero_optimization": {"stage": 4}}, load_config("lilt"), 1, 10, "s4.json")
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/no/such/nvme"}}}
    with pytest.raises(ConfigError, match=r"nvme_path='/no/such/nvme' is not a writable folder"):
        resolve_ds_config(nvme, load_config("lilt"), 1, 10)


def test_param_groups_hold_only_trainable_parameters_and_never_an_empty_group():
    model = build_model(load_config("lilt", tiny_overrides(vision_unlock=["ln"], text_unlock=["adapters"])))
    groups = param_groups(model, 0.02)
    grouped = [p for g in groups for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    only_ln = build_model(
        load_config("lilt", tiny_overrides(vision_unlock=["ln"], extra=["model.freeze_projections=true"]))
    )
    assert [g["weight_decay"] for g in param_groups(only_ln, 0.02)] == [0.0]  # no empty decay group
    nothing = build_model(
        load_config("lilt", tiny_overrides(extra=["model.freeze_projections=true", "model.freeze_logit_scale=true"]))
    )
    with pytest.raises(ConfigError, match="no trainable parameter"):
        param_groups(nothing, 0.02)


def _train_every_ds_config(rank, world_size, tmp_dir, configs):
    """Two steps per ds_config on this rank; what the optimizer holds, the loss, the temperature."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.utils import safe_get_full_fp32_param

    from lilt_ds import ds_compat
    from lilt_ds import engine as ds_engine
    from lilt_ds.models.dual_encoder import MAX_LOGIT_SCALE
    from lilt_ds.train import Trainer

    results = {}
    for path in configs:
        name = os.path.basename(path)
        ds = json.load(open(path))
        if ds.get("fp16", {}).get("enabled") and not get_accelerator().is_fp16_supported():
            results[name] = {"skipped": "fp16 is not supported by DeepSpeed's CPU accelerator here"}
            continue
        if ds.get("fp16", {}).get("enabled"):
            # dynamic loss scaling starts at 2^16 and skips the steps that overflow (the first two, on a
            # CPU with fp16 support): start low, so the two steps run and their optimizer state exists
            ds["fp16"]["initial_scale_power"] = 4
            path = os.path.join(tmp_dir, f"rank{rank}-{name}")
            json.dump(ds, open(path, "w"))
        if "nvme" in json.dumps(ds):
            if not AsyncIOBuilder().is_compatible():
                results[name] = {"skipped": "NVMe offload needs async I/O (libaio), not available here"}
                continue
            nvme_dir = os.path.join(tmp_dir, "nvme")
            os.makedirs(nvme_dir, exist_ok=True)
            for key in ("offload_optimizer", "offload_param"):
                ds["zero_optimization"][key]["nvme_path"] = nvme_dir
            path = os.path.join(tmp_dir, f"rank{rank}-{name}")
            json.dump(ds, open(path, "w"))
        cfg = load_config(
            "lilt",
            tiny_training_overrides(
                tmp_dir, [f"output_dir={os.path.join(tmp_dir, name)}", "model.init_logit_scale=6.0", "+train.no_eval=1"]
            ),
        )
        trainer = Trainer(cfg, path)
        losses = []
        for _ in range(2):
            batch = next(iter(trainer.loader))

            losses.append(trainer.train_step([trainer.to_device(batch)]))
            ds_engine.clamp_logit_scale(trainer.engine)
        model = trainer.engine.module
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        basic = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)  # fp32 ZeRO-0: unwrapped
        state_numel = sum(t.numel() for st in basic.state.values() for k, t in st.items() if k == "exp_avg")
        scale = model.logit_scale
        master = safe_get_full_fp32_param(scale)
        if master is None:  # ZeRO-0 in bf16/fp16: DeepSpeed's FP16_Optimizer holds the master
            master = ds_compat.local_fp32_master(trainer.engine, scale)
        with deepspeed.zero.GatheredParameters([scale], enabled=ds_compat.is_zero3(scale)):
            scale_value = float(scale.detach().float().max())
        results[name] = {
            "losses": losses,
            "frozen_with_grad": frozen_with_grad,
            "exp_avg_numel": state_numel,
            "trainable": sum(ds_compat.full_numel(p) for p in model.parameters() if p.requires_grad),
            "total": sum(ds_compat.full_numel(p) for p in model.parameters()),
            "scale": scale_value,
            "master_scale": None if master is None else float(master.max()),
            "max_scale": MAX_LOGIT_SCALE,
            "low_precision": any(trainer.ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16")),
        }
        trainer.engine.destroy()
        torch.distributed.barrier()
    return results


@pytest.mark.slow
def test_every_ds_config_trains_two_steps_on_two_ranks_with_frozen_parameters_free(tmp_path, capfd):
    results = run_ranks(_train_every_ds_config, 2, tmp_path, str(tmp_path), DS_CONFIGS)
    ran = 0
    for name in map(os.path.basename, DS_CONFIGS):
        per_rank = [r[name] for r in results]
        if "skipped" in per_rank[0]:
            print(f"{name}: skipped: {per_rank[0]['skipped']}")
            continue
        ran += 1
        for r in per_rank:
            assert all(math.isfinite(loss) for loss in r["losses"]), (name, r["losses"])
            assert r["frozen_with_grad"] == [], name
            assert r["scale"] <= r["max_scale"] + 1e-2, (name, r)  # bf16 rounding of ln 100
            assert r["master_scale"] is not None or not r["low_precision"], (name, r)  # a master exists: check it
            if r["master_scale"] is not None:
                assert r["master_scale"] <= r["max_scale"] + 1e-6, (name, r)
        assert per_rank[0]["losses"] == per_rank[1]["losses"], name  # the loss is global
        # optimizer state exists for trainable parameters only (partitioned across the ranks)
        state = sum(r["exp_avg_numel"] for r in per_rank)
        trainable, total = per_rank[0]["trainable"], per_rank[0]["total"]
        assert trainable <= state <= trainable * 2 + 4096, (name, state, trainable)
        assert state < total / 5, (name, state, total)
    assert ran >= 6


def _one_step_weights(rank, world_size, tmp_dir, ds_path, runs):
    """Trainable weights after one optimizer step, for each (micro batch, accumulation, exact) run."""
    from lilt_ds.export import trainable_state_from_engine
    from lilt_ds.train import Trainer

    out = {}
    for micro, accum, exact in runs:
        cfg = load_config(
            "lilt",
            tiny_training_overrides(
                tmp_dir,
                [
                    f"output_dir={tmp_dir}/m{micro}a{accum}{exact}",
                    f"train.micro_batch_size={micro}",
                    f"train.grad_accum_steps={accum}",
                    f"train.exact_accumulation={exact}",
                    "model.text.unlock=[]",
                    "train.weight_decay=0",
                    "train.min_lr=0.5",
                    "train.lr=0.5",
                    "train.grad_clip=0",
                ],
            ),
        )
        trainer = Trainer(cfg, ds_path)
        batches = iter(trainer.loader)
        trainer.train_step([trainer.to_device(next(batches)) for _ in range(accum)])
        out[f"{micro}x{accum}{'exact' if exact else ''}"] = {
            k: v.flatten().tolist() for k, v in trainable_state_from_engine(trainer.engine).items()
        }
        trainer.engine.destroy()
    return out


@pytest.mark.slow
def test_exact_accumulation_through_deepspeed_equals_one_large_batch(tmp_path):
    """SGD (update = lr x gradient) under ZeRO-2 fp32 on 2 ranks: 2 x 4 exact == 1 x 8, naive differs."""
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds.pop("bf16")
    ds["optimizer"] = {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}
    ds["zero_allow_untested_optimizer"] = True
    path = tmp_path / "sgd.json"
    path.write_text(json.dumps(ds))
    runs = [(8, 1, False), (4, 2, True), (4, 2, False)]
    weights = run_ranks(_one_step_weights, 2, tmp_path, str(tmp_path), str(path), runs)[0]
    big, exact, naive = weights["8x1"], weights["4x2exact"], weights["4x2"]

    def max_diff(a, b):
        return max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)

    assert max_diff(big, exact) < 1e-6
    assert max_diff(big, naive) > 1e-4


@pytest.mark.slow
def test_compiled_towers_train_like_eager_ones_under_zero2_and_zero3_is_refused(tmp_path):
    """train.compile compiles both trunks in place inside the engine (names, hooks, frozen parameters
    as they were); aot_eager is torch.compile's graph capture and AOT autograd without code generation."""
    from lilt_ds.export import trainable_state_from_engine
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer
    from tests.test_train import _lilt_ds_logging_restored

    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    ds["bf16"] = {"enabled": False}
    (tmp_path / "fp32.json").write_text(json.dumps(ds))
    states = {}
    with process_group_scope(), _lilt_ds_logging_restored():
        for backend in ("false", "aot_eager"):
            cfg = load_config(
                "lilt",
                tiny_training_overrides(tmp_path, [f"train.compile={backend}", f"output_dir={tmp_path / backend}"]),
            )
            trainer = Trainer(cfg, str(tmp_path / "fp32.json"), quiet=True)
            batch = trainer.to_device(next(iter(trainer.loader)))
            trainer.train_step([batch])
            trainer.train_step([batch])
            model = trainer.engine.module
            compiled = [getattr(t.trunk, "_compiled_call_impl", None) is not None for t in (model.vision, model.text)]
            states[backend] = (compiled, {k: v.clone() for k, v in trainable_state_from_engine(trainer.engine).items()})
            trainer.engine.destroy()
    assert states["false"][0] == [False, False] and states["aot_eager"][0] == [True, True]
    eager, compiled = states["false"][1], states["aot_eager"][1]
    assert eager.keys() == compiled.keys()
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-5
    cfg = load_config("lilt", tiny_overrides(extra=["train.compile=true"]))
    with pytest.raises(ConfigError, match=r"train\.compile=True with ZeRO stage 3.*zero2\.json"):
        resolve_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json")), cfg, 1, 10)
    with pytest.raises(ConfigError, match=r"train\.compile = 'fast': not a torch\.compile backend.*inductor"):
        load_config("lilt", tiny_overrides(extra=["train.compile=fast"]))
