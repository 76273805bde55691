"""Evaluation preprocessing as a model's source defined it (``eval.preprocess``): OpenCLIP's preprocess
config, a Hugging Face image processor, timm's resolved data config. Each is built by its own library, so
the tensors are the ones the model was evaluated with there."""

from __future__ import annotations

import os
from collections.abc import Sequence

SOURCES = ("open_clip", "hf", "timm")


def eval_preprocess_of(vision, setting: str) -> dict | None:
    """What ``eval.preprocess`` picks for an image tower: None (the original square resize) or the
    tower's ``eval_preprocess`` (its source's). auto: the source's for a pretrained pair (OpenCLIP,
    Hugging Face), the square resize for timm towers (the LilT recipe every preset follows)."""
    spec = getattr(vision, "eval_preprocess", None)
    if setting == "square" or spec is None or (setting == "auto" and spec["source"] == "timm"):
        return None
    return spec


def source_eval_transform(spec: dict, image_size: int, mean: Sequence[float], std: Sequence[float]):
    """A PIL image -> the normalised float tensor of the source's evaluation preprocessing."""
    source = spec["source"]
    if source == "open_clip":
        import open_clip

        return open_clip.image_transform(
            image_size,
            is_train=False,
            mean=tuple(mean),
            std=tuple(std),
            resize_mode=spec.get("resize_mode") or "shortest",
            interpolation=spec.get("interpolation") or "bicubic",
            fill_color=spec.get("fill_color", 0),
        )
    if source == "hf":
        return HfImageProcessor(spec["folder"], spec["model_type"], image_size, mean, std)
    if source == "timm":
        import timm.data

        return timm.data.create_transform(**{**spec["config"], "mean": tuple(mean), "std": tuple(std)})
    raise ValueError(f"unknown preprocessing source {source!r}: one of {', '.join(SOURCES)}")


class HfImageProcessor:
    """A PIL image -> ``pixel_values[0]`` of the pair's image processor (its preprocessor_config.json;
    a folder without one gets the processor class's defaults at the tower's size and statistics)."""

    def __init__(self, folder: str, model_type: str, image_size: int, mean, std):
        from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

        if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            self.processor = AutoImageProcessor.from_pretrained(folder)
        elif model_type == "siglip":
            size = {"height": image_size, "width": image_size}
            self.processor = SiglipImageProcessor(size=size, image_mean=list(mean), image_std=list(std))
        else:
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": image_size},
                crop_size={"height": image_size, "width": image_size},
                image_mean=list(mean),
                image_std=list(std),
            )

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HfImageProcessor({self.processor!r})"
