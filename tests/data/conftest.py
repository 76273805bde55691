"""Shared fixtures of the data tests: the real MiniLM tokenizer and small real image files."""

import pytest

from .files import write_image, write_json


@pytest.fixture(scope="session")
def tokenizer(minilm_tokenizer):
    """The real MiniLM tokenizer (tests/conftest.py loads it)."""
    return minilm_tokenizer


@pytest.fixture
def caption_file(tmp_path):
    """A pretraining JSON of `n` entries with absolute paths; entry i has captions
    ["Caption i a!", "Caption i b!", ...] (`captions_per_entry` of them, a plain string if 1)."""

    def make(n=12, captions_per_entry=1, name="train.json"):
        entries = []
        for i in range(n):
            image = write_image(tmp_path / "images" / f"{name}_{i}.jpg", colour=(10 * i % 255, 80, 160))
            captions = [f"Caption {i} {chr(97 + k)}!" for k in range(captions_per_entry)]
            entries.append(
                {"image": image, "image_id": i, "caption": captions[0] if captions_per_entry == 1 else captions}
            )
        return write_json(tmp_path / name, entries)

    return make
