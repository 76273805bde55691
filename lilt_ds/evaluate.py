"""Zero-shot retrieval: recall@K image->text and text->image from the similarity matrix.

An image counts as retrieved by any of its captions, as in the original evaluation. Ties are
broken against the model: a positive ranks behind every negative with an equal score, so a
collapsed model (all scores equal) scores zero, not a perfect recall. Similarities are computed in
chunks, so 25k captions x 5k images never build the full matrix at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

RECALL_KS = (1, 5, 10)


def _ranks_i2t(img: torch.Tensor, txt: torch.Tensor, img2txt: Sequence[Sequence[int]], chunk: int) -> torch.Tensor:
    """Per image: how many non-matching texts score at least as high as its best-scoring caption."""
    ranks = []
    for start in range(0, img.shape[0], chunk):
        scores = img[start:start + chunk] @ txt.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        for row, texts in enumerate(img2txt[start:start + chunk]):
            positive[row, list(texts)] = True
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best) & ~positive).sum(dim=1))
    return torch.cat(ranks)


def _ranks_t2i(img: torch.Tensor, txt: torch.Tensor, txt2img: Sequence[int], chunk: int) -> torch.Tensor:
    """Per text: how many other images score at least as high as its image."""
    ranks = []
    target = torch.as_tensor(list(txt2img), dtype=torch.long)
    for start in range(0, txt.shape[0], chunk):
        scores = txt[start:start + chunk] @ img.T
        rows = torch.arange(scores.shape[0])
        mine = target[start:start + chunk]
        own = scores[rows, mine].unsqueeze(1)
        higher = scores >= own
        higher[rows, mine] = False
        ranks.append(higher.sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, img2txt: Sequence[Sequence[int]],
                      txt2img: Sequence[int], ks: Sequence[int] = RECALL_KS, chunk: int = 1024) -> dict:
    """``{"txt_r1": .., "img_r1": .., ..., "txt_r_mean", "img_r_mean", "r_mean"}`` in percent.

    ``txt_rK`` is image->text recall (the original project's naming), ``img_rK`` text->image.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    i2t = _ranks_i2t(image_emb, text_emb, img2txt, chunk)
    t2i = _ranks_t2i(image_emb, text_emb, txt2img, chunk)
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (i2t < k).float().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (t2i < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


@torch.no_grad()
def encode_retrieval_data(model, data, batch_size: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image and text of a ``lilt_ds.data.RetrievalData``, in order.

    Every rank runs every forward (ZeRO-3 gathers parameters collectively, so a rank that skipped a
    batch would hang the others).
    """
    was_training = model.training
    model.eval()
    images = [model.encode_image(b["images"].to(device, dtype)).float().cpu() for b in data.image_loader(batch_size)]
    texts = [model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
             for b in data.text_batches(batch_size)]
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(model, data, batch_size: int, device, dtype=torch.float32) -> dict:
    image_emb, text_emb = encode_retrieval_data(model, data, batch_size, device, dtype)
    return retrieval_metrics(image_emb, text_emb, data.img2txt, data.txt2img)


def format_retrieval_table(metrics: dict, ks: Sequence[int] = RECALL_KS) -> str:
    """A Markdown table of recall@K in both directions."""
    head = "| direction | " + " | ".join(f"R@{k}" for k in ks) + " | mean |"
    rule = "|---|" + "---:|" * (len(ks) + 1)
    rows = [f"| image->text | " + " | ".join(f"{metrics[f'txt_r{k}']:.2f}" for k in ks) + f" | {metrics['txt_r_mean']:.2f} |",
            f"| text->image | " + " | ".join(f"{metrics[f'img_r{k}']:.2f}" for k in ks) + f" | {metrics['img_r_mean']:.2f} |"]
    return "\n".join([head, rule, *rows])
