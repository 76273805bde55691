"""The learning benchmark's real-data set (benchmarks/learning_data.py), from a folder laid out as
Debian's tuxpaint-stamps-default lays out its stamps."""

import json
import os

from learning_data import captioned_stamps, ensure_learning_data
from PIL import Image

from lilt_ds.data import load_caption_files


def stamps(root):
    """Six captioned stamps with transparent backgrounds, one mirror view, one repeated and one
    one-word caption, one stamp without a caption."""
    captions = {
        "animals/cow": "A cow.",
        "animals/sea_lion": "A sea lion.",
        "food/apple": "A red apple.",
        "food/apple_mirror": "A red apple.",
        "plants/holly": "Holly leaves are shiny and have prickles!",
        "plants/flower": "A flower.",
        "plants/flower2": "A flower.",
        "town/house": "House.",
        "town/car": "A blue car.",
        "town/bus": "A yellow school bus.",
    }
    for i, (stem, caption) in enumerate(captions.items()):
        os.makedirs(root / os.path.dirname(stem), exist_ok=True)
        image = Image.new("RGBA", (40 + 5 * i, 30), (0, 0, 0, 0))
        image.paste((200, 30 * i, 40, 255), (5, 5, 20, 20))
        image.save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n")
    Image.new("RGB", (10, 10)).save(root / "town" / "no_caption.png")
    return root


def test_one_pair_per_distinct_english_caption(tmp_path):
    pairs = captioned_stamps(str(stamps(tmp_path / "stamps")))
    captions = [caption for _, caption in pairs]
    assert sorted(captions) == sorted(
        [
            "A cow.",
            "A sea lion.",
            "A red apple.",
            "Holly leaves are shiny and have prickles!",
            "A flower.",
            "A blue car.",
            "A yellow school bus.",
        ]
    )
    assert not any(path.endswith("_mirror.png") for path, _ in pairs)


def test_the_prepared_set_is_in_the_original_formats_with_a_fixed_split(tmp_path):
    folder = str(stamps(tmp_path / "stamps"))
    paths = ensure_learning_data(size=32, eval_n=2, folder=folder)
    assert (paths["pairs"], paths["held_out"]) == (5, 2)
    table = load_caption_files([paths["train"]])
    assert len(table) == paths["pairs"]
    with open(paths["eval"]) as f:
        held = json.load(f)
    image = Image.open(os.path.join(paths["image_root"], held[0]["image"]))
    assert image.mode == "RGB" and image.size == (32, 32) and min(image.getpixel((0, 0))) >= 250  # on white
    assert ensure_learning_data(size=32, eval_n=2, folder=folder) == paths  # cached: the same files
