import contextlib
import re

import pytest
import torch

from lilt_ds.config import ConfigError, load_config
from lilt_ds.models import build_model
from tests.conftest import tiny_overrides


def tiny_model(mode="lilt", vision_unlock=(), text_unlock=(), extra=()):
    torch.manual_seed(0)
    return build_model(load_config("lilt", tiny_overrides(mode, vision_unlock, text_unlock, extra=extra)))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def tower_trainable(model, tower):
    prefix = f"{tower}.trunk."
    return {n[len(prefix) :] for n in trainable_names(model) if n.startswith(prefix)}


HEADS = {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "logit_scale"}


def batch(n=2, size=32):
    return torch.randn(n, 3, size, size), torch.randint(1, 1000, (n, 9)), torch.ones(n, 9, dtype=torch.long)


def test_clip_trains_everything_lit_locks_the_image_tower():
    clip = tiny_model("clip")
    assert all(p.requires_grad for p in clip.parameters())
    lit = tiny_model("lit")
    assert tower_trainable(lit, "vision") == set()
    assert all(p.requires_grad for p in lit.text.parameters())
    assert HEADS <= trainable_names(lit)
    assert lit.fully_locked == {"vision"}


def test_lilt_with_empty_unlock_trains_only_the_heads():
    model = tiny_model("lilt")
    assert trainable_names(model) == HEADS
    assert model.fully_locked == {"vision", "text"}


# item -> regex every trainable trunk parameter name must match (and at least one does), per tower
EXPECTED = {
    "ln": (r"(norm\d?|\.norm|fc_norm)\.(weight|bias)$", r"LayerNorm\.(weight|bias)$"),
    "bitfit": (r"bias$", r"bias$"),
    "adapters": (r"\.adapter\.(down|up)\.(weight|bias)$", r"\.adapter\.(down|up)\.(weight|bias)$"),
    "attn": (
        r"blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)$",
        r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)\.(weight|bias)$",
    ),
    "mlp": (
        r"blocks\.\d+\.mlp\.fc[12]\.(weight|bias)$",
        r"encoder\.layer\.\d+\.(intermediate|output)\.dense\.(weight|bias)$",
    ),
    "top_k:1": (r"^blocks\.11\.", r"^encoder\.layer\.1\."),
    "lora": (r"\.lora_[AB]\.default\.weight$", r"\.lora_[AB]\.default\.weight$"),
}


@pytest.mark.parametrize("item", list(EXPECTED))
def test_each_unlock_item_trains_exactly_its_parameters(item):
    model = tiny_model("lilt", [item], [item])
    for tower, pattern in zip(("vision", "text"), EXPECTED[item]):
        names = tower_trainable(model, tower)
        assert names, f"{item} unlocked nothing in the {tower} tower"
        wrong = [n for n in names if not re.search(pattern, n)]
        assert not wrong, f"{item} unlocked unexpected {tower} parameters: {wrong[:5]}"
        # and nothing that matches the pattern stayed frozen
        frozen = [
            n
            for n, p in getattr(model, tower).trunk.named_parameters()
            if re.search(pattern, n) and not p.requires_grad
        ]
        assert not frozen, f"{item} left matching {tower} parameters frozen: {frozen[:5]}"
    assert HEADS <= trainable_names(model)


def test_unlock_items_compose_per_tower():
    model = tiny_model("lilt", ["ln", "adapters"], ["bitfit"])
    vision, text = tower_trainable(model, "vision"), tower_trainable(model, "text")
    assert any(".adapter." in n for n in vision) and any("norm" in n for n in vision)
    assert text and all(n.endswith("bias") for n in text)


def test_lit_image_tower_may_unlock_norms():
    model = tiny_model("lit", vision_unlock=["ln"])
    assert tower_trainable(model, "vision") and model.fully_locked == set()


@pytest.mark.parametrize(
    "position, hosts", [("output", r"blocks\.\d+\.(attn\.proj|mlp\.fc2)"), ("branch_input", r"blocks\.\d+\.norm[12]")]
)
def test_fresh_adapters_are_the_identity(position, hosts):
    plain = tiny_model("lilt")
    adapted = tiny_model("lilt", ["adapters"], ["adapters"], extra=[f"model.vision.adapter_position={position}"])
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapter." in k for k in missing)
    vision_hosts = {n.split(".adapter.")[0] for n in missing if n.startswith("vision.")}
    assert len(vision_hosts) == 24 and all(re.fullmatch(r"vision\.trunk\." + hosts, h) for h in vision_hosts)
    images, ids, mask = batch()
    for a, b in zip(plain.eval()(images, ids, mask), adapted.eval()(images, ids, mask)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and they are really on the forward path: perturbing one changes the output
    with torch.no_grad():
        next(m for n, m in adapted.named_modules() if n.endswith("adapter")).up.bias.fill_(1.0)
    assert not torch.allclose(adapted(images, ids, mask)[0], plain(images, ids, mask)[0])


def test_patch_dropout_drops_in_training_keeps_the_prefix_and_sees_every_patch_in_evaluation():
    size = ["image_size=64"]  # 16 patches
    plain = tiny_model("clip", extra=size)
    dropped = tiny_model("clip", extra=[*size, "model.vision.patch_dropout=0.5"])
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            dropped.eval().encode_image(images), plain.eval().encode_image(images), rtol=0, atol=0
        )  # evaluation: every patch, the same function
        seen = {}
        hook = dropped.vision.trunk.patch_drop.register_forward_hook(
            lambda m, args, out: seen.update(inputs=args[0], out=out)
        )
        first = dropped.train().encode_image(images)
        second = dropped.encode_image(images)
        hook.remove()
    assert not torch.allclose(first, second)  # a new draw per call, per sample
    assert seen["out"].shape[1] == 1 + 8 and torch.equal(seen["out"][:, 0], seen["inputs"][:, 0])  # CLS kept
    kept = [{tuple(row.tolist()) for row in seen["out"][b, 1:]} for b in range(3)]
    assert all(k <= {tuple(row.tolist()) for row in seen["inputs"][b, 1:]} for b, k in enumerate(kept))
    assert kept[0] != kept[1] or kept[1] != kept[2]  # each sample draws its own patches
    locked = tiny_model("lit", extra=[*size, "model.vision.patch_dropout=0.5"]).train()
    assert locked.fully_locked == {"vision"} and not locked.vision.training and locked.vision.trunk.patch_drop.training


@contextlib.contextmanager
def count_saved_tensors(module):
    """Count the tensors autograd saves for backward while ``module`` runs its forward."""
    counter, stack = {"n": 0}, contextlib.ExitStack()

    def pack(t):
        counter["n"] += 1
        return t

    pre = module.register_forward_pre_hook(
        lambda *_: stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    )
    post = module.register_forward_hook(lambda *_: stack.close())
    try:
        yield counter
    finally:
        pre.remove(), post.remove(), stack.close()


@pytest.mark.parametrize("mode,locked", [("lit", True), ("clip", False)])
def test_a_locked_tower_saves_no_tensors_for_backward(mode, locked):
    model = tiny_model(mode)
    images, ids, mask = batch()
    with count_saved_tensors(model.vision) as saved:
        img, txt, scale = model(images, ids, mask)
    (img @ txt.T * scale).sum().backward()
    assert (saved["n"] == 0) == locked, saved
    assert not model.vision.training if locked else model.vision.training


def test_locked_batchnorm_keeps_its_statistics():
    cfg = load_config(
        "demo",
        [
            "model.vision.pretrained=false",
            "model.text.name=tiny",
            "model.text.pretrained=false",
            "model.text.unlock=[]",
            "image_size=64",
        ],
    )
    model = build_model(cfg)
    bn = next(m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    assert not bn.training and bn.weight.requires_grad  # affine params train, statistics stay
    model(*batch(4, 64))
    torch.testing.assert_close(bn.running_mean, before)


def test_logit_scale_init_and_clamp():
    model = tiny_model("lilt")
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(2.6592600, abs=1e-6)  # ln(1/0.07)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(4.6051702, abs=1e-6)  # ln 100
    siglip = tiny_model("lilt", extra=["loss.type=siglip"])
    out = siglip(*batch())
    assert len(out) == 4 and out[2].item() == pytest.approx(10.0, rel=1e-6) and out[3].item() == -10.0


def test_embeddings_are_normalised_and_image_size_is_honoured():
    model = tiny_model("clip", extra=["image_size=48"])
    img, txt, _ = model(*batch(3, 48))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert model.vision.trunk.patch_embed.img_size == (48, 48)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model(
            "lilt",
            ["ln", "adapters"],
            ["ln", "adapters"],
            extra=[f"model.vision.grad_checkpointing={ckpt}", f"model.text.grad_checkpointing={ckpt}"],
        )
        torch.manual_seed(1)
        img, txt, scale = model.eval()(*batch())
        (img @ txt.T * scale).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["vision_encoder=deit_tinyy_patch16_224"],
            r"unknown vision model 'deit_tinyy_patch16_224'.*deit_tiny_patch16_224",
        ),
        (["model.vision.pretrained=/nonexistent/w.pth"], r"vision weights file /nonexistent/w\.pth does not exist"),
        (["model.vision.pretrained=local-dir:/nonexistent"], r"folder /nonexistent does not exist"),
        (
            ["model.text.pretrained=/nonexistent/bert"],
            r"model\.text\.pretrained=/nonexistent/bert: folder /nonexistent/bert does not exist",
        ),
        (["model.vision.pretrained=pkg:nope"], r"unknown packaged weights 'pkg:nope'"),
        (["model.vision.unlock=[ln,layernorm]"], r"unknown unlock item 'layernorm' in model\.vision\.unlock.*bitfit"),
        (["model.text.unlock=[top_k]"], r"top_k needs a block count"),
        (["model.text.unlock=[top_k:9]"], r"top_k:9 is out of range: the text tower has 2 blocks"),
        (["mode=clip", "model.text.unlock=[ln]"], r"mode=clip trains the whole text tower"),
        (["model.text.pooling=max"], r"model\.text\.pooling = 'max': expected one of cls, mean"),
        (["model.text.adapter_position=branch_input"], r"model\.text\.adapter_position=branch_input: BERT.*use output"),
        (["model.vision.adapter_position=before"], r"model\.vision\.adapter_position.*one of output, branch_input"),
        (
            ["model.vision.patch_dropout=0.95"],
            r"model\.vision\.patch_dropout = 0\.95: expected a number >= 0 and <= 0\.9",
        ),
        (
            ["model.vision.patch_dropout=0.5", "vision_encoder=tf_efficientnet_lite0"],
            r"patch_dropout=0\.5: the vision tower 'tf_efficientnet_lite0' has no patch tokens",
        ),
    ],
)
def test_bad_model_config_gives_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model(load_config("lilt", tiny_overrides() + overrides))


@pytest.mark.parametrize("item", ["adapters", "attn", "mlp", "top_k:1", "lora"])
def test_transformer_only_items_on_a_convolutional_tower_fail_clearly(item):
    cfg = load_config("lilt", tiny_overrides(vision_unlock=[item]) + ["vision_encoder=tf_efficientnet_lite0"])
    with pytest.raises(ConfigError, match=rf"{item.split(':')[0]}.*needs transformer blocks.*tf_efficientnet_lite0"):
        build_model(cfg)


def test_the_package_entry_point_builds_the_same_model():
    import lilt_ds

    cfg = load_config("lilt", tiny_overrides("lilt", ["ln"], ["ln"]))
    ours, models = lilt_ds.build_model(cfg), build_model(cfg)
    assert [(n, p.shape, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in models.named_parameters()
    ]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), models.state_dict().values()))
