"""The learning benchmark's real-data sets (benchmarks/learning_data.py), from folders laid out as
Debian's tuxpaint-stamps-default and openclipart-svg/-png lay out theirs."""

import json
import os

from learning_data import captioned_stamps, ensure_learning_data, titled_clipart
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
    paths = ensure_learning_data(size=32, eval_n=2, folders={"tuxpaint": folder})
    assert (paths["pairs"], paths["held_out"]) == (5, 2)
    assert paths["sources"] == {"tuxpaint": {"pairs": 5, "held_out": 2}}
    table = load_caption_files([paths["train"]])
    assert len(table) == paths["pairs"]
    with open(paths["eval"]) as f:
        held = json.load(f)
    image = Image.open(os.path.join(paths["image_root"], held[0]["image"]))
    assert image.mode == "RGB" and image.size == (32, 32) and min(image.getpixel((0, 0))) >= 250  # on white
    assert ensure_learning_data(size=32, eval_n=2, folders={"tuxpaint": folder}) == paths  # cached: the same files


SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:creator><cc:Agent><dc:title>Jane Painter</dc:title></cc:Agent></dc:creator>
    <dc:title>{title}</dc:title>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""


def clipart(root):
    """Drawings as Debian's openclipart packages lay them out (svg/ with titles, png/ beside): English
    titles, a collection name, a file name, an Italian label, a one-word title, a repeated title, a
    black-and-white copy and a drawing without its PNG."""
    titles = {
        "furniture/soft_blue_couch": "Soft Blue Couch",
        "signs/tsunami_warning": "tsunami  warning\n sign",
        "icons/a": "Lemon SVG theme",
        "icons/b": "Lemon SVG theme",
        "icons/c": "Lemon SVG theme",
        "unsorted/file": "image_01 copy",
        "food/pesca": "Pesca noce matura",
        "food/apple": "Apple",
        "food/hot_dog": "Hot Dog",
        "food/hot_dog_bw": "Hot Dog (B and W)",
        "food/hot_dog_2": "hot dog",
        "animals/duck": "Yellow Duck",
    }
    for i, (stem, title) in enumerate(titles.items()):
        for kind in ("svg", "png"):
            os.makedirs(root / kind / os.path.dirname(stem), exist_ok=True)
        (root / "svg" / f"{stem}.svg").write_text(SVG.format(title=title))
        if stem != "animals/duck":
            image = Image.new("RGBA", (30, 20 + i), (0, 0, 0, 0))
            image.paste((20 * i, 90, 200, 255), (3, 3, 15, 15))
            image.save(root / "png" / f"{stem}.png")
    return root


def test_clipart_keeps_english_titles_that_name_one_drawing(tmp_path):
    vocabulary = {"soft", "blue", "couch", "tsunami", "warning", "sign", "lemon", "svg", "theme", "hot", "dog"}
    vocabulary |= {"apple", "yellow", "duck", "image", "copy", "and", "b", "w"}
    pairs = titled_clipart(str(clipart(tmp_path / "clipart")), vocabulary)
    assert [(os.path.relpath(png, tmp_path / "clipart"), title) for png, title in pairs] == [
        ("png/food/hot_dog.png", "Hot Dog"),
        ("png/furniture/soft_blue_couch.png", "Soft Blue Couch"),
        ("png/signs/tsunami_warning.png", "tsunami warning sign"),
    ]


def test_two_sources_are_held_out_alike_and_counted(tmp_path):
    folders = {"tuxpaint": str(stamps(tmp_path / "stamps")), "openclipart": str(clipart(tmp_path / "clipart"))}
    paths = ensure_learning_data(size=32, eval_n=1, sources=("tuxpaint", "openclipart"), folders=folders)
    assert paths["sources"] == {"tuxpaint": {"pairs": 6, "held_out": 1}, "openclipart": {"pairs": 2, "held_out": 1}}
    with open(paths["eval"]) as f:
        held = json.load(f)
    assert len(held) == 2 and len(load_caption_files([paths["train"]])) == 8
