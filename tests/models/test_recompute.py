"""Frozen-aware recompute: exact gradients of what trains, far fewer saved activation bytes."""

import copy

import pytest
import torch

from lilt_ds.config import load_config
from lilt_ds.memory import SavedTensorMeter
from lilt_ds.models import apply_frozen_recompute, build_model
from tests.conftest import tiny_overrides


def saved_bytes_and_grads(model, batch):
    """Bytes of non-parameter tensors autograd saves for backward, and the trainable parameters' gradients."""
    meter = SavedTensorMeter(model.parameters())
    torch.manual_seed(1)  # the same dropout masks in both models
    with meter:
        image_emb, text_emb, scale = model(*batch)
        loss = (image_emb @ text_emb.T * scale).logsumexp(1).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return meter.bytes, grads


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 1000, (2, 9), generator=generator), mask


@pytest.mark.parametrize(
    "vision_unlock, text_unlock, expected_patches, max_ratio",
    [
        (["ln", "adapters"], ["ln", "adapters"], 2 * 12 + 2 * 2, 0.6),  # tiny: 12 ViT blocks, 2 BERT layers
        (["bitfit"], ["ln"], 2 * 12 + 2 * 2, 0.6),
        (["ln", "mlp"], ["ln", "top_k:1"], 12 + 2, 0.9),  # trainable weights (ViT MLPs, the top BERT layer) stay
    ],
)
def test_recompute_gradients_are_exact_and_saved_bytes_drop(
    batch, vision_unlock, text_unlock, expected_patches, max_ratio
):
    model = build_model(load_config("lilt", tiny_overrides("lilt", vision_unlock, text_unlock)), load_weights=False)
    patched = copy.deepcopy(model)
    assert apply_frozen_recompute(patched) == expected_patches
    assert apply_frozen_recompute(patched) == 0  # idempotent
    default_bytes, default_grads = saved_bytes_and_grads(model, batch)
    recompute_bytes, recompute_grads = saved_bytes_and_grads(patched, batch)
    for got, want in zip(recompute_grads, default_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert recompute_bytes < max_ratio * default_bytes
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_the_backward_recompute_runs_under_the_forwards_autocast():
    """Forward under CPU autocast (bf16), backward outside it, as a training loop does: the recompute
    must run in bf16 again (torch.utils.checkpoint does the same), or its gradients are those of an
    fp32 forward the run never made."""
    from lilt_ds.models.recompute import recompute_call

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 16, generator=generator)  # frozen
    bias = torch.randn(16, generator=generator, requires_grad=True)  # trains
    ran = []

    def block(x):
        y = torch.nn.functional.linear(x, weight, bias)
        ran.append((torch.is_grad_enabled(), y.dtype))
        return torch.nn.functional.gelu(y)

    results = []
    for recompute in (False, True):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = recompute_call(block, (x,), [bias]) if recompute else block(x)
        results.append(torch.autograd.grad(out.float().square().sum(), [x, bias]))
    assert ran == [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.bfloat16)]
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def test_clip_and_fully_locked_towers_are_not_patched():
    clip = build_model(load_config("clip", tiny_overrides("clip")), load_weights=False)
    assert apply_frozen_recompute(clip) == 0
    locked = build_model(load_config("lilt", tiny_overrides("lilt", [], ["ln"])), load_weights=False)
    assert apply_frozen_recompute(locked) == 2 * 2  # the fully locked vision tower runs under no_grad anyway


def test_config_switch_patches_the_built_model():
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model
    from tests.conftest import tiny_overrides

    plain = build_model(load_config("lilt", tiny_overrides("lilt", ["ln", "adapters"], ["ln", "adapters"])))
    patched = build_model(
        load_config(
            "lilt",
            tiny_overrides("lilt", ["ln", "adapters"], ["ln", "adapters"], extra=["memory.frozen_recompute=true"]),
        )
    )
    from lilt_ds.models import apply_frozen_recompute

    assert apply_frozen_recompute(plain) > 0 and apply_frozen_recompute(patched) == 0  # already patched


def _two_steps(rank, world_size, tmp_dir, ds_path):
    """Losses of 2 steps and the trainable weights after them, with and without recompute."""
    from lilt_ds.export import trainable_state_from_engine
    from lilt_ds.train import Trainer
    from tests.conftest import tiny_training_overrides

    out = {}
    for recompute in (False, True):
        cfg = load_config(
            "lilt",
            tiny_training_overrides(
                tmp_dir,
                [
                    f"output_dir={tmp_dir}/recompute{recompute}",
                    f"memory.frozen_recompute={recompute}",
                    "model.text.unlock=[ln,adapters]",
                ],
            ),
        )
        trainer = Trainer(cfg, ds_path)
        batches = iter(trainer.loader)
        losses = [trainer.train_step([trainer.to_device(next(batches))]) for _ in range(2)]
        weights = trainable_state_from_engine(trainer.engine)
        out[str(recompute)] = {"losses": losses, "weights": {k: v.flatten().tolist() for k, v in weights.items()}}
        trainer.engine.destroy()
    return out


def fp32_ds_config(tmp_path, name):
    import json
    import os

    from lilt_ds.engine import load_ds_config

    ds = load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", name))
    ds.pop("bf16")
    path = tmp_path / f"fp32_{name}"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.slow
def test_recompute_under_deepspeed_on_two_ranks_trains_exactly_like_autograd(tmp_path):
    """A real ZeRO-2 engine on 2 gloo ranks, fp32: 2 steps give the same losses and weights with recompute."""
    from tests.distributed import run_ranks

    result = run_ranks(_two_steps, 2, tmp_path, str(tmp_path), fp32_ds_config(tmp_path, "zero2.json"))[0]
    plain, recompute = result["False"], result["True"]
    assert plain["losses"] == pytest.approx(recompute["losses"], rel=1e-6, abs=1e-6)
    assert plain["weights"].keys() == recompute["weights"].keys()
    for name, values in plain["weights"].items():
        torch.testing.assert_close(
            torch.tensor(recompute["weights"][name]), torch.tensor(values), atol=1e-6, rtol=1e-6, msg=name
        )


def test_recompute_with_zero3_is_refused_before_training(tmp_path):
    from lilt_ds.config import ConfigError
    from lilt_ds.engine import load_ds_config, resolve_ds_config
    from tests.conftest import tiny_training_overrides

    cfg = load_config("lilt", tiny_training_overrides(str(tmp_path), ["memory.frozen_recompute=true"]))
    ds = load_ds_config(fp32_ds_config(tmp_path, "zero3.json"))
    with pytest.raises(ConfigError, match="frozen_recompute.*ZeRO stage 3.*zero2.json"):
        resolve_ds_config(ds, cfg, world_size=1, total_steps=2)
    resolve_ds_config(load_ds_config(fp32_ds_config(tmp_path, "zero2.json")), cfg, world_size=1, total_steps=2)
