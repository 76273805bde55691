"""Writing small real test inputs: JPEG images and JSON files."""

import json

from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def write_image(path, colour=(200, 30, 30), size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG")
    return str(path)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
"""scikit-image's sample photographs (in its wheel): 300 to 1411 pixels a side, several aspect ratios."""


def write_photos(folder, names=PHOTOS, quality=95) -> list[str]:
    """scikit-image's sample photographs as JPEG files in ``folder``; their paths."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, "JPEG", quality=quality)
        paths.append(str(path))
    return paths


def write_json(path, data):
    path.write_text(json.dumps(data, indent=1))
    return str(path)
