"""Caption cleaning and tokenization (lilt_ds/data/preprocessing/text.py)."""

import pytest

from lilt_ds.data import DataError, ImageTextCollator, pre_caption, tokenize_captions


def test_pre_caption_matches_the_original_cleaning():
    assert pre_caption("  A man's  bike, (red)!\n") == "a mans bike red"
    assert pre_caption("black-and-white photo/sketch") == "black and white photo sketch"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("<person> waves") == "person waves"


def test_tokenize_pads_to_the_longest_and_truncates(tokenizer):
    batch = tokenize_captions(tokenizer, ["a cat", "a very long caption " * 10], max_length=12)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1] + [0] * 8
    short = tokenize_captions(tokenizer, ["a cat", "a dog sat"], max_length=25)
    assert short["input_ids"].shape == (2, 5)


def test_tokenizer_without_pad_token_is_rejected(tokenizer):
    class NoPad:
        pad_token = None

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    with pytest.raises(DataError, match=r"has no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        ImageTextCollator(NoPad(), max_length=25)
