"""lilt_ds.ds_compat against the installed DeepSpeed: every private attribute it lists exists on the
real engines, optimizers and parameters it is used on, the fp32 master it finds is the one DeepSpeed
steps, and a layout it does not know stops with an error instead of a None."""

import copy
import os

import pytest
import torch

from lilt_ds import ds_compat
from lilt_ds import engine as ds_engine
from lilt_ds.config import load_config
from lilt_ds.losses import ContrastiveLoss, as_fp32
from lilt_ds.models import build_model
from lilt_ds.runtime import init_distributed, process_group_scope
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _engine(stage: int, bf16: bool):
    ds = ds_engine.load_ds_config(os.path.join(ROOT, "ds_configs", f"zero{stage}.json"))
    ds["bf16"] = {"enabled": bf16}
    cfg = load_config(
        "lilt", tiny_overrides("lilt", ["ln"], ["ln"], extra=["train.micro_batch_size=2", "model.init_logit_scale=5.0"])
    )
    resolved = ds_engine.resolve_ds_config(ds, cfg, world_size=1, total_steps=2)
    engine, _, _ = ds_engine.initialize(build_model(cfg), resolved, cfg, 2)
    return engine


@pytest.fixture(scope="module")
def engines():
    """One real engine per layout lilt_ds reads: ZeRO-0 fp32 and bf16, ZeRO-2 bf16, ZeRO-3 bf16."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_bf16_supported():
        pytest.skip("DeepSpeed's accelerator here runs no bf16: the mixed-precision layouts cannot be built")
    with process_group_scope():
        init_distributed()
        built = {
            name: _engine(stage, bf16)
            for name, (stage, bf16) in {
                "zero0_fp32": (0, False),
                "zero0_bf16": (0, True),
                "zero2_bf16": (2, True),
                "zero3_bf16": (3, True),
            }.items()
        }
        yield built
        for engine in built.values():
            engine.destroy()


def test_every_private_attribute_listed_exists_where_it_is_used(engines):
    import deepspeed.comm.comm
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses, zero3_linear_wrap
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero0, zero2 = engines["zero0_bf16"], engines["zero2_bf16"]
    fused = [ds_compat._stepping_optimizer(e.optimizer) for e in engines.values()]
    assert all(isinstance(adam, FusedAdam) for adam in fused)  # the ds_configs' "Adam" without offload
    assert isinstance(zero0.optimizer, FP16_Optimizer) and isinstance(zero2.optimizer, DeepSpeedZeroOptimizer)
    trainable = [p for p in zero2.module.parameters() if p.requires_grad]
    found = {
        "deepspeed.runtime.engine:DeepSpeedEngine": [hasattr(e, "enable_backward_allreduce") for e in engines.values()],
        "deepspeed.runtime.fp16.fused_optimizer:FP16_Optimizer": [
            hasattr(zero0.optimizer, a) for a in ("fp16_groups", "fp32_groups_flat")
        ],
        "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer": [hasattr(p, "_hp_mapping") for p in trainable],
        "ZeRO-3 parameter": [
            hasattr(p, a)
            for p in engines["zero3_bf16"].module.parameters()
            for a in ds_compat.PRIVATE["ZeRO-3 parameter"]
        ],
        # set on the class once a ZeRO-3 engine replaced F.linear
        "deepspeed.runtime.zero.partition_parameters:InsertPostInitMethodToModuleSubClasses": [
            hasattr(InsertPostInitMethodToModuleSubClasses, "linear_bk")
        ],
        "deepspeed.runtime.zero.partition_parameters:zero3_linear_wrap": [callable(zero3_linear_wrap)],
        "an engine's optimizer wrapper (ZeRO, FP16/BF16)": [
            hasattr(engines[name].optimizer, "optimizer") for name in ("zero0_bf16", "zero2_bf16", "zero3_bf16")
        ],
        "deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam": [
            hasattr(DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))]), a) for a in ("ds_opt_adam", "opt_id")
        ],
        "deepspeed.ops.adam.fused_adam:FusedAdam": [
            hasattr(adam, a) for adam in fused for a in ds_compat.PRIVATE["deepspeed.ops.adam.fused_adam:FusedAdam"]
        ],
        "deepspeed.comm.torch:TorchBackend": [hasattr(deepspeed.comm.comm.cdb, "shm_comm_op")],
    }
    assert set(found) == set(ds_compat.PRIVATE)  # a new private access comes with its check here
    assert {owner: all(present) for owner, present in found.items()} == {owner: True for owner in found}


@pytest.mark.parametrize("name", ["zero0_bf16", "zero2_bf16"])
def test_the_master_found_is_the_fp32_copy_deepspeed_steps(engines, name):
    engine = engines[name]
    scale = engine.module.logit_scale
    master = ds_compat.local_fp32_master(engine, scale)
    assert master is not None and master.dtype == torch.float32
    assert float(master.max()) == pytest.approx(5.0) and scale.dtype == torch.bfloat16
    with torch.no_grad():
        master.fill_(3.0)  # a view of what DeepSpeed steps: its next step copies it into the bf16 parameter
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(2, 3, 32, 32, generator=generator).bfloat16(),
        torch.randint(5, 100, (2, 6), generator=generator),
        torch.ones(2, 6, dtype=torch.long),
    )
    engine.backward(ContrastiveLoss()(*as_fp32(engine(*batch))))
    engine.step()
    assert float(scale.detach().float()) == pytest.approx(3.0, abs=0.02)  # bf16 of 3.0 less one lr-sized step


def test_fp32_without_zero_keeps_no_master_and_zero3_parameters_are_refused(engines):
    assert ds_compat.local_fp32_master(engines["zero0_fp32"], engines["zero0_fp32"].module.logit_scale) is None
    with pytest.raises(ValueError, match="ZeRO-3"):
        ds_compat.local_fp32_master(engines["zero3_bf16"], engines["zero3_bf16"].module.logit_scale)
    zero3 = engines["zero3_bf16"].module.logit_scale
    assert ds_compat.is_zero3(zero3) and ds_compat.full_numel(zero3) == 1
    assert ds_compat.torch_linear_function() is not torch.nn.functional.linear  # ZeRO-3 replaced it


def test_a_renamed_attribute_stops_the_clamp_instead_of_skipping_it(engines):
    engine = engines["zero2_bf16"]
    scale = engine.module.logit_scale
    mapping = scale._hp_mapping
    del scale._hp_mapping  # as if DeepSpeed had renamed it
    try:
        with pytest.raises(ds_compat.UnknownLayout, match=r"_hp_mapping.*tested with \(>=0\.19\.3,<0\.20\)"):
            ds_engine.clamp_logit_scale(engine)
    finally:
        scale._hp_mapping = mapping

    class Engine:  # an optimizer class this module has never seen
        optimizer = object()

    with pytest.raises(ds_compat.UnknownLayout, match="optimizer is a object"):
        ds_compat.local_fp32_master(Engine(), torch.nn.Parameter(torch.zeros(1)))


@pytest.mark.parametrize("kind", ["DeepSpeedCPUAdam", "FusedAdam"])
def test_a_replayed_cpu_adam_resumes_bit_for_bit_where_a_fresh_one_does_not(kind):
    """DeepSpeed's C++ CPU Adam loaded at step 2 computes beta2^3 as pow(beta2, 3), the uninterrupted one as
    beta2^2 * beta2: 1 ulp apart in float32, so the third update differs; after the replay it does not.
    DeepSpeedCPUAdam is ZeRO-Offload's optimizer, FusedAdam the CPU accelerator's "Adam"."""
    from deepspeed.ops import adam as ds_adam

    def new_adam(param):
        return getattr(ds_adam, kind)([param], lr=1e-3)

    def new_process(adam):
        """FusedAdam's C++ Adam is one per process: a step far away stands for a new process's first."""
        if kind == "FusedAdam":
            ds_compat._cpu_adam_update(adam)[0](10**6, adam.param_groups[0], [torch.zeros(1) for _ in range(4)])

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4096, generator=generator) for _ in range(3)]

    def stepped(param, adam, steps):
        for grad in steps:
            param.grad = grad.clone()
            adam.step()
        return param

    straight = torch.nn.Parameter(torch.zeros(4096))
    adam = new_adam(straight)
    new_process(adam)
    stepped(straight, adam, grads)
    interrupted = torch.nn.Parameter(torch.zeros(4096))
    adam = new_adam(interrupted)
    new_process(adam)
    stepped(interrupted, adam, grads[:2])
    saved = copy.deepcopy(adam.state_dict())
    equal_to_straight = {}
    for replay in (False, True):
        resumed = torch.nn.Parameter(interrupted.detach().clone())
        fresh = new_adam(resumed)
        fresh.load_state_dict(copy.deepcopy(saved))
        new_process(fresh)
        if replay:
            assert ds_compat.replay_cpu_adam_steps(fresh) == 2
        equal_to_straight[replay] = torch.equal(stepped(resumed, fresh, grads[2:]), straight)
    # without the replay: DeepSpeed's own rounding (if this ever holds, DeepSpeed fixed it and the replay can go)
    assert equal_to_straight == {False: False, True: True}
    assert ds_compat.replay_cpu_adam_steps(torch.optim.SGD([straight], lr=0.1)) == 0  # not DeepSpeed's: nothing


def test_setup_pins_the_tested_range():
    import deepspeed
    from packaging.specifiers import SpecifierSet

    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert f'"deepspeed{ds_compat.TESTED}"' in setup
    assert deepspeed.__version__ in SpecifierSet(ds_compat.TESTED)
