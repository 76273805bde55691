"""The built-in demo dataset (lilt_ds/data/demo.py)."""

import json
import random

import numpy as np
import pytest

from lilt_ds.cli.make_demo import main as make_demo
from lilt_ds.data import DataError, build_retrieval_data, demo, ensure_demo_data, generate_demo, load_caption_files

from .files import MEAN, STD


def test_generation_is_deterministic_for_a_seed(tmp_path):
    generate_demo(tmp_path / "a", n=12, eval_n=4, seed=3, size=64)
    first = (tmp_path / "a" / "train.json").read_bytes()
    generate_demo(tmp_path / "a", n=12, eval_n=4, seed=3, size=64)
    assert (tmp_path / "a" / "train.json").read_bytes() == first
    generate_demo(tmp_path / "b", n=12, eval_n=4, seed=3, size=64)
    assert (tmp_path / "b" / "eval.json").read_bytes() == (tmp_path / "a" / "eval.json").read_bytes()
    generate_demo(tmp_path / "c", n=12, eval_n=4, seed=4, size=64)
    assert (tmp_path / "c" / "eval.json").read_bytes() != (tmp_path / "a" / "eval.json").read_bytes()


def test_output_is_well_formed_in_both_formats(tmp_path, tokenizer):
    paths = generate_demo(tmp_path, n=10, eval_n=5, seed=0, size=48)
    train = json.loads((tmp_path / "train.json").read_text())
    assert [e["image_id"] for e in train] == list(range(10))
    assert all(len(e["caption"]) == 4 and e["image"].startswith(str(tmp_path)) for e in train)
    table = load_caption_files([paths["train"]])
    assert len(table) == 10 and table.missing_images() == []
    evaluation = build_retrieval_data(paths["eval"], paths["image_root"], tokenizer, 32, MEAN, STD)
    assert len(evaluation.images) == 5 and len(evaluation.texts) == 20
    assert evaluation.images[0]["image"].shape == (3, 32, 32)
    train_images = {e["image"] for e in train}
    assert not any(str(tmp_path / e["image"]) in train_images for e in json.loads((tmp_path / "eval.json").read_text()))


def test_captions_describe_what_is_drawn():
    for i in range(60):
        scene = demo.sample_scene(random.Random(i))
        pixels = np.asarray(demo.draw_scene(scene, 128)).astype(int)
        caption = demo.scene_captions(scene)[0]
        for group in scene.groups:
            expected = np.clip(np.array(demo.COLOURS[group.colour]) + scene.tint, 0, 255)
            assert len(group.centres) == group.count
            for x, y in group.centres:
                assert np.abs(pixels[int(y * 128), int(x * 128)] - expected).max() <= 1
            count = {1: "a", 2: "two", 3: "three"}[group.count]
            noun = group.shape + ("s" if group.count > 1 else "")
            assert f"{count} {group.size} {group.colour} {noun}" in caption
        if scene.relation in ("above", "below"):
            ys = [np.mean([y for _, y in g.centres]) for g in scene.groups]
            assert (ys[0] < ys[1]) == (scene.relation == "above")


def test_count_and_article_wording():
    group = demo.Group(1, "small", "orange", "star", ((0.5, 0.5),))
    assert demo._phrase(group) == "a small orange star"
    assert demo._phrase(group, with_size=False) == "an orange star"
    assert demo._phrase(group, article=False) == "one small orange star"
    assert demo._phrase(demo.Group(3, "large", "red", "circle", ())) == "three large red circles"


def test_command_line(tmp_path, capsys):
    make_demo(["--out", str(tmp_path), "--n", "3", "--eval-n", "2", "--size", "32"])
    assert json.loads(capsys.readouterr().out)["train"] == str(tmp_path / "train.json")
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 5


def test_ensure_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LILT_DS_CACHE", str(tmp_path))
    paths = ensure_demo_data(n=6, seed=2, eval_n=3, size=32)
    folder = tmp_path / "demo-6-2-eval3-32px"
    assert paths == {"train": str(folder / "train.json"), "eval": str(folder / "eval.json"), "image_root": str(folder)}
    assert json.loads((folder / "train.json").read_text())[0]["image"].startswith(str(folder))
    stamp = (folder / "train.json").stat().st_mtime_ns
    monkeypatch.setattr(demo, "generate_demo", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_demo_data(n=6, seed=2, eval_n=3, size=32) == paths
    assert (folder / "train.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no scratch folders left


def test_ensure_accepts_losing_the_race_to_another_rank(tmp_path, monkeypatch):
    real = demo.generate_demo

    def generate_while_another_rank_finishes_first(out, **kwargs):
        real(kwargs["final_dir"], **{**kwargs, "final_dir": None})  # the other rank's rename
        return real(out, **kwargs)

    monkeypatch.setattr(demo, "generate_demo", generate_while_another_rank_finishes_first)
    paths = ensure_demo_data(cache_dir=tmp_path / "demo", n=4, eval_n=2, size=32)
    assert load_caption_files([paths["train"]]).missing_images() == []
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_ensure_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "demo").mkdir()
    with pytest.raises(DataError, match=r"demo exists but holds no demo dataset .* delete it"):
        ensure_demo_data(cache_dir=tmp_path / "demo", n=4)
