"""Frozen-aware recomputation: frozen MLPs and attention projections of a lilt tower keep only their input.

Autograd's default keeps every intermediate a frozen sub-block produces (the 4x-wide GELU input and
output of an MLP, q/k/v and the attention output), although the frozen weights themselves need no
gradient. :class:`_RecomputeFrozen` runs such a sub-block without recording, saves its inputs, and
in backward reruns it (same RNG and autocast state, so dropout draws the same masks) to get exact gradients for
the inputs and for the parameters inside that do train (biases, adapters hooked on the output
linear, LayerNorms). Only sub-blocks whose weight matrices are all frozen are patched.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from ..runtime import replay_torch_rng, torch_rng_state
from .text import BERT_LAYOUT
from .vision import TIMM_TRANSFORMER


class _RecomputeFrozen(torch.autograd.Function):
    """outputs = fn(*inputs); saves the inputs only; ``params`` (the trainable ones inside) get gradients.

    The backward rerun replays what the forward ran under: the RNG state of the inputs' device (so
    dropout draws the same masks) and the autocast state of that device and of the CPU (so a
    bf16-autocast forward is recomputed in bf16), as torch.utils.checkpoint does.
    """

    @staticmethod
    def forward(ctx, fn, n_inputs: int, *inputs_and_params):
        inputs = inputs_and_params[:n_inputs]
        ctx.fn, ctx.params = fn, inputs_and_params[n_inputs:]
        device = next((t.device for t in inputs if t.device.type != "cpu"), torch.device("cpu"))
        ctx.rng = torch_rng_state(device)
        ctx.autocast = _autocast_state(device.type)
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            outputs = fn(*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad(), replay_torch_rng(ctx.rng), _replay_autocast(ctx.autocast):
            outputs = ctx.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        grads = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            if pairs and wanted
            else []
        )
        return (None, None, *(next(grads) if t.requires_grad else None for t in (*inputs, *ctx.params)))


def _autocast_state(device_type: str) -> dict[str, dict]:
    """torch.autocast arguments in force now, for the inputs' device type and for the CPU."""
    return {
        kind: {
            "device_type": kind,
            "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }
        for kind in dict.fromkeys((device_type, "cpu"))
    }


@contextlib.contextmanager
def _replay_autocast(state: dict[str, dict]):
    with contextlib.ExitStack() as stack:
        for kwargs in state.values():
            stack.enter_context(torch.autocast(**kwargs))
        yield


def recompute_call(fn, inputs: tuple[torch.Tensor, ...], params: list[nn.Parameter]):
    """``fn(*inputs)`` through :class:`_RecomputeFrozen` when autograd records, else directly."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*inputs, *params)):
        return fn(*inputs)
    outputs = _RecomputeFrozen.apply(fn, len(inputs), *inputs, *params)
    return outputs if len(outputs) > 1 else outputs[0]


def _frozen(*linears: nn.Module) -> bool:
    return all(not lin.weight.requires_grad for lin in linears) and not any(
        "lora_" in name for lin in linears for name, _ in lin.named_parameters()
    )


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _patch_forward(module: nn.Module, owners: list[nn.Module]) -> None:
    """module(x, *rest, **kwargs) recomputed: tensor positional args are saved, the rest is closed over."""
    original = module.forward

    def forward(self, hidden, *args, **kwargs):
        return recompute_call(lambda h: original(h, *args, **kwargs), (hidden,), _trainable(*owners))

    module.forward = types.MethodType(forward, module)


def _patch_bert_mlp(intermediate: nn.Module, output_dense: nn.Linear) -> None:
    """BERT splits its MLP into intermediate(dense+GELU) and output.dense: fuse them into one
    recomputed call inside output.dense (intermediate passes its input through)."""
    inter_forward, dense_forward = intermediate.forward, output_dense.forward
    intermediate.forward = types.MethodType(lambda self, hidden: hidden, intermediate)

    def dense(self, hidden):
        return recompute_call(lambda h: dense_forward(inter_forward(h)), (hidden,), _trainable(intermediate, self))

    output_dense.forward = types.MethodType(dense, output_dense)


def _patch_timm(trunk: nn.Module) -> int:
    patched = 0
    for block in getattr(trunk, "blocks", []):
        mlp, attn = getattr(block, "mlp", None), getattr(block, "attn", None)
        if mlp is not None and hasattr(mlp, "fc1") and _frozen(mlp.fc1, mlp.fc2):
            _patch_forward(mlp, [mlp])  # the adapter hook on fc2 runs inside: recomputed too
            patched += 1
        if attn is not None and hasattr(attn, "qkv") and _frozen(attn.qkv, attn.proj):
            _patch_forward(attn, [attn])
            patched += 1
    return patched


def _patch_bert(trunk: nn.Module) -> int:
    patched = 0
    for layer in trunk.encoder.layer:
        if _frozen(layer.intermediate.dense, layer.output.dense):
            _patch_bert_mlp(layer.intermediate, layer.output.dense)
            patched += 1
        self_attn = layer.attention.self
        if _frozen(self_attn.query, self_attn.key, self_attn.value):
            _patch_forward(self_attn, [self_attn])
            patched += 1
    return patched


PATCHERS = {TIMM_TRANSFORMER: _patch_timm, BERT_LAYOUT: _patch_bert}


def apply_frozen_recompute(model: nn.Module) -> int:
    """Patch the frozen MLPs / attention of a DualEncoder's partially trainable towers; returns the count.

    Fully locked towers (run under no_grad) and towers without a known layout are left alone. Call
    once, after the unlocks are applied (adapters and LoRA must exist already).
    """
    if getattr(model, "_frozen_recompute_applied", False):
        return 0
    patched = 0
    for kind in ("vision", "text"):
        tower = getattr(model, kind)
        if kind in getattr(model, "fully_locked", ()) or tower.layout not in PATCHERS:
            continue
        patched += PATCHERS[tower.layout](tower.trunk)
    model._frozen_recompute_applied = True
    return patched
