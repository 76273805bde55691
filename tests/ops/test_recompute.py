"""Frozen-aware recompute: exact gradients of what trains, far fewer saved activation bytes."""

import copy

import pytest
import torch

from lilt_ds.config import load_config
from lilt_ds.models import build_model
from lilt_ds.ops import apply_frozen_recompute
from lilt_ds.memory import SavedTensorMeter
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


@pytest.mark.parametrize("vision_unlock, text_unlock, expected_patches, max_ratio", [
    (["ln", "adapters"], ["ln", "adapters"], 2 * 12 + 2 * 2, 0.6),  # tiny: 12 ViT blocks, 2 BERT layers
    (["bitfit"], ["ln"], 2 * 12 + 2 * 2, 0.6),
    (["ln", "mlp"], ["ln", "top_k:1"], 12 + 2, 0.9),  # trainable weights (ViT MLPs, the top BERT layer) stay
])
def test_recompute_gradients_are_exact_and_saved_bytes_drop(batch, vision_unlock, text_unlock, expected_patches,
                                                           max_ratio):
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
    patched = build_model(load_config("lilt", tiny_overrides("lilt", ["ln", "adapters"], ["ln", "adapters"],
                                                              extra=["memory.frozen_recompute=true"])))
    from lilt_ds.ops import apply_frozen_recompute

    assert apply_frozen_recompute(plain) > 0 and apply_frozen_recompute(patched) == 0  # already patched
