"""Caption text: the original LilT cleaning, and tokenization for a batch of captions."""

import re
from collections.abc import Sequence

import torch

from ..errors import DataError

_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption as the original LilT did (its `pre_caption`): lower-case, drop punctuation,
    turn '-' and '/' into spaces, collapse whitespace, keep the first `max_words` words."""
    caption = _PUNCTUATION.sub("", caption.lower()).replace("-", " ").replace("/", " ")
    caption = caption.replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def check_tokenizer(tokenizer) -> None:
    """Fail early, with the fix, for a tokenizer that cannot pad a batch."""
    if not callable(tokenizer):
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) is not callable; pass the "
            "text tower's Hugging Face tokenizer (AutoTokenizer.from_pretrained(...))."
        )
    if getattr(tokenizer, "pad_token", None) is None:
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no pad token, so captions of different "
            "lengths cannot be batched; set one, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )


def tokenize_captions(tokenizer, captions: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest caption and truncated to `max_length` tokens:
    `{"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}`."""
    encoded = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}
