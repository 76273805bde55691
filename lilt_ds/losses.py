"""Contrastive losses for dual encoders, exact under data parallelism with gradient averaging.

Every loss is called as ``loss_fn(image_emb, text_emb, logit_scale, logit_bias=None)`` with this
rank's L2-normalised embeddings [B, D] and the already-exponentiated ``logit_scale`` ([1] or 0-d).
Ranks may hold different batch sizes B_r; the global batch has N = sum_r B_r rows in rank order.

How the scaling is chosen (one idea used by every class below). Let L be the loss of the whole
global batch computed in one process, W the world size, x_r a rank's features. DeepSpeed (like DDP)
AVERAGES parameter gradients over ranks. The features are all-gathered with gradient, and the
gather's backward SUMS over ranks the gradients every rank's loss sends to x_r. Each rank
therefore backpropagates a surrogate whose summed feature gradient is W * dL/dx_r; its parameter
gradient is W times its own shard's share of dL/dtheta, and the 1/W average gives exactly
dL/dtheta. The reported VALUE is always L itself (identical on every rank); where the surrogate's
value differs from L, the returned tensor carries L's value and the surrogate's gradient.

Reference: OpenCLIP's ClipLoss/SigLipLoss (local_loss + gather_with_grad is the exact, scalable
configuration); the chunked variant is the blockwise reference for a fused kernel.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .distributed import all_gather_rows, all_reduce_sum, gather_rank_info, world_info
from .errors import ConfigError
from .models.dual_encoder import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, encode_batch
from .runtime import set_torch_rng_state, torch_rng_state
from .schema import LossSettings, as_section, user_fields


class NonFiniteInputError(ValueError):
    """NaN/inf in a loss input. Raised on EVERY rank at once (the check is exchanged), so a
    trainer can catch it to skip the step in sync instead of crashing."""


def siglip_init_values() -> tuple[float, float]:
    """(log-scale, bias) a model should initialise its SigLIP parameters with."""
    return SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS


# --------------------------------------------------------------------------------------------------
# Input checks and autograd helpers
# --------------------------------------------------------------------------------------------------


def _check_shapes(image_emb: torch.Tensor, text_emb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> None:
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if emb.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(emb.shape)}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb shapes differ: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    for name, value in scalars.items():
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value (shape [1] or []), got shape {tuple(value.shape)}")


def _named_inputs(image_emb, text_emb, logit_scale, logit_bias) -> dict[str, torch.Tensor]:
    named = {"image_emb": image_emb, "text_emb": text_emb, "logit_scale": logit_scale}
    if logit_bias is not None:
        named["logit_bias"] = logit_bias
    return named


def _nonfinite_bits(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """One int64 on the inputs' device, bit i set when input i holds NaN/inf: computed without a host sync."""
    device = next(iter(named.values())).device
    nonfinite = torch.stack([~torch.isfinite(t.detach()).all().to(device) for t in named.values()])
    return (nonfinite.long() << torch.arange(len(named), device=device)).sum()


def _nonfinite_message(names: list[str], bits_per_rank: list[int]) -> str | None:
    where = (lambda rank: f" on rank {rank}") if len(bits_per_rank) > 1 else (lambda rank: "")
    problems = [
        ", ".join(name for i, name in enumerate(names) if bits >> i & 1) + where(rank)
        for rank, bits in enumerate(bits_per_rank)
        if bits
    ]
    return f"non-finite values (NaN or inf) in {'; '.join(problems)}" if problems else None


def check_loss_inputs(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> list[int]:
    """Validate the inputs on every rank at once; return every rank's batch size (rank order).

    Shape problems raise at once (they are the same on every rank). Finiteness, empty batches and
    the embedding width travel with the batch sizes in ONE tiny all_gather, so a NaN or an empty
    batch on one rank raises the same error on all ranks instead of leaving the others hanging in
    the feature gather. That exchange is a host sync; see ``_DataParallelLoss.static_batches`` for
    the path without one.
    """
    named = _named_inputs(image_emb, text_emb, logit_scale, logit_bias)
    _check_shapes(image_emb, text_emb, {k: v for k, v in named.items() if k.startswith("logit")})
    rows_width = torch.tensor(image_emb.shape, device=image_emb.device)
    per_rank = gather_rank_info(torch.cat([rows_width, _nonfinite_bits(named).reshape(1)]))
    problem = _nonfinite_message(list(named), [bits for _, _, bits in per_rank])
    if problem:
        raise NonFiniteInputError(problem)
    widths = [width for _, width, _ in per_rank]
    if len(set(widths)) > 1:
        raise ValueError(f"embedding width differs across ranks: {widths}")
    sizes = [rows for rows, _, _ in per_rank]
    if 0 in sizes:
        raise ValueError(f"empty batch: image_emb and text_emb have 0 rows (rows per rank: {sizes})")
    return sizes


def as_fp32(outputs):
    """A model's outputs in fp32, as every loss here takes them whatever the engine's precision
    (exp and log-sum-exp need the range)."""
    return tuple(o.float() for o in outputs)


def value_with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is exactly ``value`` and whose gradient is that of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in value (exactly); multiplies the gradient flowing back through it by ``factor``."""
    return value_with_gradient_of(tensor, tensor * factor)


# --------------------------------------------------------------------------------------------------
# One rank's view of the global batch
# --------------------------------------------------------------------------------------------------


@dataclass
class GatheredBatch:
    """This rank's rows and every rank's rows (rank order) of the global batch."""

    local_img: torch.Tensor  # [B_r, D]
    local_txt: torch.Tensor  # [B_r, D]
    all_img: torch.Tensor  # [N, D]
    all_txt: torch.Tensor  # [N, D]
    offset: int  # global index of this rank's first row = sum of the earlier ranks' B
    world_size: int

    @property
    def n_global(self) -> int:
        return self.all_img.shape[0]


def gather_batch(
    image_emb: torch.Tensor, text_emb: torch.Tensor, sizes: list[int], with_grad: bool = True
) -> GatheredBatch:
    """All-gather both modalities; ``sizes`` are every rank's row counts (unequal allowed).

    with_grad=False keeps autograd only through this rank's own slot and multiplies that slot's
    gradient by W, which is what makes GLOBAL mode exact without a backward collective (see
    ContrastiveLoss).
    """
    rank, world_size = world_info()
    own_img, own_txt = image_emb, text_emb
    if not with_grad and world_size > 1:
        own_img, own_txt = scale_gradient(image_emb, world_size), scale_gradient(text_emb, world_size)
    return GatheredBatch(
        local_img=image_emb,
        local_txt=text_emb,
        all_img=all_gather_rows(own_img, sizes, with_grad),
        all_txt=all_gather_rows(own_txt, sizes, with_grad),
        offset=sum(sizes[:rank]),
        world_size=world_size,
    )


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


class _DataParallelLoss(nn.Module):
    """Checks, gathering and the exact-averaging scaling shared by all losses.

    Subclasses implement ``summed_loss``: the SUM of per-row losses over the rows this rank computes
    (its own rows in local mode, all N rows in global mode). The global loss L is the sum over all
    rows divided by N.
    """

    accepts_bias = False
    static_batches = False
    """True when every rank calls with the same number of rows, as the trainer's loader guarantees
    (it drops incomplete batches). The loss then exchanges no sizes and makes no host sync: a NaN
    or inf input does not raise but makes the returned value non-finite on every rank (the gather
    carries it everywhere), and :meth:`nonfinite_report` says afterwards where it came from."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True with gather_with_grad=False drops the gradient other ranks' rows send to "
                "this rank's features, so gradients are wrong with more than one rank; "
                "use gather_with_grad=True (or local_loss=False)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._nonfinite: torch.Tensor | None = None  # static_batches: inputs seen non-finite since the last report
        self._input_names: list[str] = []
        self.step_signal: torch.Tensor | None = None
        """A one-element tensor each rank sets (the trainer's stop request): summed over the ranks in
        the all-reduce of the loss value, into :attr:`summed_step_signal` (no collective of its own in
        local mode; global mode, which reduces nothing else, makes one of a single number)."""
        self.summed_step_signal: torch.Tensor | None = None

    def nonfinite_report(self) -> str:
        """Which inputs of the calls since the last report held NaN/inf, on which rank (static_batches).

        A collective with a host sync: call it on every rank, when the loss came out non-finite.
        """
        bits = self._nonfinite if self._nonfinite is not None else torch.zeros((), dtype=torch.long)
        self._nonfinite = None
        message = _nonfinite_message(self._input_names, [row[0] for row in gather_rank_info(bits.reshape(1))])
        return message or "every input was finite: the loss itself overflowed (logit scale or features too large)"

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is not None and not self.accepts_bias:
            raise ValueError(
                f"{type(self).__name__} got a logit_bias: a softmax loss is invariant to it, so it would never "
                "train; use the 'siglip' loss or build the model without a logit bias"
            )
        if self.static_batches:
            named = _named_inputs(image_emb, text_emb, logit_scale, logit_bias)
            _check_shapes(image_emb, text_emb, {k: v for k, v in named.items() if k.startswith("logit")})
            if image_emb.shape[0] == 0:
                raise ValueError("empty batch: image_emb and text_emb have 0 rows")
            bits = _nonfinite_bits(named)
            self._nonfinite = bits if self._nonfinite is None else self._nonfinite | bits
            self._input_names = list(named)
            sizes = [image_emb.shape[0]] * world_info()[1]
        else:
            sizes = check_loss_inputs(image_emb, text_emb, logit_scale, logit_bias)
        batch = gather_batch(image_emb, text_emb, sizes, with_grad=self.gather_with_grad)
        scale = logit_scale.reshape(())
        bias = None if logit_bias is None else logit_bias.reshape(())
        summed = self.summed_loss(batch, scale, bias)
        signal = self.step_signal
        if not self.local_loss:  # every rank computed the full global loss
            self.summed_step_signal = None if signal is None else all_reduce_sum(signal)
            return summed / batch.n_global
        surrogate = summed * (batch.world_size / batch.n_global)
        if signal is None:
            global_value = all_reduce_sum(summed) / batch.n_global
        else:  # the signal rides along in the loss's own all-reduce
            reduced = all_reduce_sum(torch.cat([summed.detach().reshape(1), signal.to(summed.dtype).reshape(1)]))
            global_value, self.summed_step_signal = reduced[0] / batch.n_global, reduced[1]
        return value_with_gradient_of(global_value, surrogate)


class ContrastiveLoss(_DataParallelLoss):
    """Symmetric InfoNCE (CLIP): L = (1/N) sum_i (CE(img_i -> texts, i) + CE(txt_i -> images, i)) / 2.

    local_loss=True: each rank computes its B_r rows against all N gathered columns in both
    directions (two B_r x N logit matrices, labels arange(B_r) + offset) and backpropagates
    (W/N) * (its rows' summed loss); the returned value is L (one scalar all_reduce).
    local_loss=False: each rank computes the full N x N logits and returns L itself.

    Gradients (W = world size): with gather_with_grad=True, in both modes each rank's feature
    gradient is W * dL/dx_r (the gather's backward sums W contributions), so each rank's tower
    gradient is W times its shard's share and DeepSpeed's 1/W average is exactly dL/dtheta. The
    logit_scale gradient is (W/N) * d(own rows)/ds in local mode (mean over ranks = dL/ds) and dL/ds
    on every rank in global mode. With local_loss=False, gather_with_grad=False, the own slot's
    feature gradient dL/dx_r is multiplied by W explicitly: exact too, with no backward collective.
    local_loss=True, gather_with_grad=False is rejected (it loses terms).

    Unequal local batch sizes across ranks are supported EXACTLY: the sizes travel in the input
    check's tiny all_gather, shards are padded for the feature gather and trimmed after it.
    A logit_bias is rejected (softmax is shift-invariant: the bias would never train).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, cache_labels: bool = True):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, rows: int, offset: int, device: torch.device) -> torch.Tensor:
        """Targets arange(rows) + offset, cached per (device, rows, offset) when cache_labels."""
        key = (device, rows, offset)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(offset, offset + rows, device=device)
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.local_loss:
            logits_per_image = scale * batch.local_img @ batch.all_txt.T
            logits_per_text = scale * batch.local_txt @ batch.all_img.T
            labels = self.labels(batch.local_img.shape[0], batch.offset, batch.local_img.device)
        else:
            logits_per_image = scale * batch.all_img @ batch.all_txt.T
            logits_per_text = logits_per_image.T
            labels = self.labels(batch.n_global, 0, batch.all_img.device)
        image_to_text = F.cross_entropy(logits_per_image, labels, reduction="sum")
        text_to_image = F.cross_entropy(logits_per_text, labels, reduction="sum")
        return (image_to_text + text_to_image) / 2


class SigLipLoss(_DataParallelLoss):
    """Sigmoid loss (SigLIP): L = -(1/N) sum_{i,j} logsigmoid(y_ij * (s * img_i . txt_j + b)),
    y = 2I - 1 over the global N x N pairs.

    Normalisation: divided by the GLOBAL batch N, so L is exactly the single-process loss of the
    global batch; with equal shards this equals OpenCLIP's per-rank sum / B averaged over ranks.
    Each rank computes its B_r image rows against all N gathered texts (text features all-gathered
    with grad instead of OpenCLIP's ring exchange) and backpropagates (W/N) * its rows' sum; the
    value returned is L (one scalar all_reduce). Computed as sum(softplus(z)) - sum(z_positive),
    which is identical to the labelled form without materialising the label matrix.

    Gradients: each rank's image-feature gradient is W * dL/dimg_r (its rows are only in its own
    loss, scaled by W) and its text-feature gradient is W * dL/dtxt_r (summed over ranks by the
    gather); the scale and bias gradients are (W/N) * d(own rows)/d(s, b), whose mean over ranks is
    dL/d(s, b). DeepSpeed's 1/W average therefore gives exactly dL/dtheta.
    Unequal local batch sizes are supported exactly. logit_bias=None means no bias term.
    Initialise models with :func:`siglip_init_values` (log-scale ln 10, bias -10).

    Memory: with more gathered texts than ``chunk_size``, the B x N logits are never materialised:
    :func:`chunked_siglip_loss_fn` sums them in chunk_size x chunk_size blocks and recomputes each
    block in backward (the same value and gradients). Up to ``chunk_size`` texts the plain matrix form
    runs, as before.
    """

    accepts_bias = True

    def __init__(self, chunk_size: int = 4096):
        super().__init__(local_loss=True, gather_with_grad=True)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if batch.n_global > self.chunk_size:
            return chunked_siglip_loss_fn(batch.local_img, batch.all_txt, scale, bias, batch.offset, self.chunk_size)
        logits = scale * batch.local_img @ batch.all_txt.T
        if bias is not None:
            logits = logits + bias
        positives = logits.diagonal(offset=batch.offset)  # (i, offset + i)
        return F.softplus(logits).sum() - positives.sum()


class ChunkedContrastiveLoss(ContrastiveLoss):
    """ContrastiveLoss computed blockwise: never materialises the B x N (or N x N) logits.

    Same value, gradients, modes, scaling and unequal-batch support as :class:`ContrastiveLoss`
    (the subclass only replaces how the summed row losses are computed), hence the same
    gradients per rank: features W * dL/dx_r, so DeepSpeed's 1/W average is exact. Row and column
    log-sum-exps are accumulated over chunk_size x chunk_size blocks in forward and the blocks are
    recomputed in backward by :func:`chunked_clip_loss_fn`. Memory O((B + N) * D + chunk_size^2).
    """

    def __init__(self, chunk_size: int = 4096, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=False)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.local_loss:
            rows_img, rows_txt, offset = batch.local_img, batch.local_txt, batch.offset
        else:
            rows_img, rows_txt, offset = batch.all_img, batch.all_txt, 0
        return chunked_clip_loss_fn(rows_img, rows_txt, batch.all_img, batch.all_txt, scale, offset, self.chunk_size)


# --------------------------------------------------------------------------------------------------
# Blockwise InfoNCE: the reference for a fused kernel
# --------------------------------------------------------------------------------------------------


def _blocks(length: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


def _blockwise_logsumexp(
    queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """lse_i = log sum_j exp(scale * q_i . k_j), one chunk x chunk block of logits at a time."""
    lse = torch.full((queries.shape[0],), -math.inf, dtype=queries.dtype, device=queries.device)
    scaled_queries = scale * queries
    for rows in _blocks(queries.shape[0], chunk_size):
        for cols in _blocks(keys.shape[0], chunk_size):  # running merge: log(e^a + e^b)
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(scaled_queries[rows] @ keys[cols].T, dim=1))
    return lse


def _blockwise_logsumexp_grads(
    queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i lse_i w.r.t. (queries, keys, scale), recomputing each block's softmax.

    With P = softmax_j(scale * Q K^T): dQ = scale * P K, dK = scale * P^T Q, ds = sum(P * Q K^T).
    """
    grad_queries = torch.zeros_like(queries)
    grad_keys = torch.zeros_like(keys)
    grad_scale = torch.zeros((), dtype=queries.dtype, device=queries.device)
    key_blocks = _blocks(keys.shape[0], chunk_size)
    for rows in _blocks(queries.shape[0], chunk_size):
        for cols in key_blocks:
            dots = queries[rows] @ keys[cols].T
            probs = torch.mul(dots, scale).sub_(lse[rows, None]).exp_()  # two chunk^2 buffers in all
            grad_queries[rows] += probs @ keys[cols]
            grad_keys[cols] += probs.T @ queries[rows]
            grad_scale += torch.dot(probs.flatten(), dots.flatten())
    return grad_queries.mul_(scale), grad_keys.mul_(scale), grad_scale


class _ChunkedClipLoss(torch.autograd.Function):
    """Autograd wrapper of the blockwise loss; saves only features and the 2B row log-sum-exps."""

    @staticmethod
    def forward(ctx, local_img, local_txt, all_img, all_txt, scale, offset: int, chunk_size: int):
        compute = torch.promote_types(local_img.dtype, torch.float32)
        q_img, q_txt, k_img, k_txt, s = (t.to(compute) for t in (local_img, local_txt, all_img, all_txt, scale))
        rows = slice(offset, offset + q_img.shape[0])
        lse_img = _blockwise_logsumexp(q_img, k_txt, s, chunk_size)
        lse_txt = _blockwise_logsumexp(q_txt, k_img, s, chunk_size)
        positive_img = s * (q_img * k_txt[rows]).sum(dim=1)
        positive_txt = s * (q_txt * k_img[rows]).sum(dim=1)
        loss = ((lse_img - positive_img).sum() + (lse_txt - positive_txt).sum()) / 2
        ctx.save_for_backward(local_img, local_txt, all_img, all_txt, scale, lse_img, lse_txt)
        ctx.offset, ctx.chunk_size = offset, chunk_size
        return loss.to(local_img.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        local_img, local_txt, all_img, all_txt, scale, lse_img, lse_txt = ctx.saved_tensors
        compute = lse_img.dtype
        q_img, q_txt, k_img, k_txt, s = (t.to(compute) for t in (local_img, local_txt, all_img, all_txt, scale))
        rows = slice(ctx.offset, ctx.offset + q_img.shape[0])

        # log-sum-exp terms, both directions
        d_q_img, d_k_txt, d_s_img = _blockwise_logsumexp_grads(q_img, k_txt, s, lse_img, ctx.chunk_size)
        d_q_txt, d_k_img, d_s_txt = _blockwise_logsumexp_grads(q_txt, k_img, s, lse_txt, ctx.chunk_size)
        # minus the positive logits s * q_i . k_(offset+i)
        d_q_img -= s * k_txt[rows]
        d_k_txt[rows] -= s * q_img
        d_q_txt -= s * k_img[rows]
        d_k_img[rows] -= s * q_txt
        d_s = d_s_img + d_s_txt - (q_img * k_txt[rows]).sum() - (q_txt * k_img[rows]).sum()

        half = grad_loss.to(compute) / 2  # in place below: no extra (B + N) x D copies
        return (
            d_q_img.mul_(half).to(local_img.dtype),
            d_q_txt.mul_(half).to(local_txt.dtype),
            d_k_img.mul_(half).to(all_img.dtype),
            d_k_txt.mul_(half).to(all_txt.dtype),
            (d_s * half).reshape(scale.shape).to(scale.dtype),
            None,
            None,
        )


def chunked_clip_loss_fn(
    local_img: torch.Tensor,
    local_txt: torch.Tensor,
    all_img: torch.Tensor,
    all_txt: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    chunk_size: int,
) -> torch.Tensor:
    """Summed symmetric InfoNCE of the local rows, computed in chunk_size x chunk_size blocks.

    Returns sum_i (CE(s * img_i . all_txt^T, offset + i) + CE(s * txt_i . all_img^T, offset + i)) / 2
    over the B local rows, where all_img/all_txt [N, D] hold the local rows at offset..offset+B-1.
    Gradients flow to all five tensors separately (the local rows and their copies inside the
    gathered tensors), exactly as in the matrix formulation. Computed in at least float32.
    """
    if not 0 <= offset <= all_img.shape[0] - local_img.shape[0]:
        raise ValueError(
            f"offset {offset} puts {local_img.shape[0]} local rows outside {all_img.shape[0]} gathered rows"
        )
    return _ChunkedClipLoss.apply(local_img, local_txt, all_img, all_txt, scale.reshape(()), offset, chunk_size)


class _ChunkedSigLip(torch.autograd.Function):
    """sum_ij softplus(s q_i . k_j + b) - sum_i (s q_i . k_(offset+i) + b), block by block; saves only
    the features. With z the logits, dz = sigmoid(z) (minus 1 at the positives), and
    dq = s dz K, dk = s dz^T Q, ds = sum(dz * Q K^T), db = sum(dz)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, offset: int, chunk_size: int):
        compute = torch.promote_types(queries.dtype, torch.float32)
        q, k, s = queries.to(compute), keys.to(compute), scale.to(compute)
        b = torch.zeros((), dtype=compute, device=q.device) if bias is None else bias.to(compute)
        total = torch.zeros((), dtype=compute, device=q.device)
        for rows in _blocks(q.shape[0], chunk_size):
            scaled = s * q[rows]
            for cols in _blocks(k.shape[0], chunk_size):
                total += F.softplus(
                    torch.addmm(b.expand(rows.stop - rows.start, cols.stop - cols.start), scaled, k[cols].T)
                ).sum()
        positives = s * (q * k[offset : offset + q.shape[0]]).sum() + q.shape[0] * b
        ctx.save_for_backward(queries, keys, scale, bias if bias is not None else torch.empty(0))
        ctx.has_bias, ctx.offset, ctx.chunk_size = bias is not None, offset, chunk_size
        return (total - positives).to(queries.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        queries, keys, scale, bias = ctx.saved_tensors
        compute = torch.promote_types(queries.dtype, torch.float32)
        q, k, s = queries.to(compute), keys.to(compute), scale.to(compute)
        b = bias.to(compute) if ctx.has_bias else torch.zeros((), dtype=compute, device=q.device)
        own = slice(ctx.offset, ctx.offset + q.shape[0])
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        grad_s = torch.zeros((), dtype=compute, device=q.device)
        grad_b = torch.zeros((), dtype=compute, device=q.device)
        for rows in _blocks(q.shape[0], ctx.chunk_size):
            for cols in _blocks(k.shape[0], ctx.chunk_size):
                dots = q[rows] @ k[cols].T
                dz = torch.mul(dots, s).add_(b).sigmoid_()  # d softplus(z) / dz
                grad_q[rows] += dz @ k[cols]
                grad_k[cols] += dz.T @ q[rows]
                grad_s += torch.dot(dz.flatten(), dots.flatten())
                grad_b += dz.sum()
        grad_q.mul_(s).sub_(s * k[own])  # the positives' -z terms
        grad_k.mul_(s)
        grad_k[own] -= s * q
        grad_s -= (q * k[own]).sum()
        grad_b -= q.shape[0]
        g = grad_loss.to(compute)
        return (
            grad_q.mul_(g).to(queries.dtype),
            grad_k.mul_(g).to(keys.dtype),
            (grad_s * g).reshape(scale.shape).to(scale.dtype),
            (grad_b * g).reshape(bias.shape).to(bias.dtype) if ctx.has_bias else None,
            None,
            None,
        )


def chunked_siglip_loss_fn(
    local_img: torch.Tensor,
    all_txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int,
    chunk_size: int,
) -> torch.Tensor:
    """Summed sigmoid loss of the B local image rows against the N gathered texts (the local rows'
    texts at offset..offset+B-1), in chunk_size x chunk_size blocks; computed in at least float32."""
    if not 0 <= offset <= all_txt.shape[0] - local_img.shape[0]:
        raise ValueError(
            f"offset {offset} puts {local_img.shape[0]} local rows outside {all_txt.shape[0]} gathered rows"
        )
    return _ChunkedSigLip.apply(
        local_img, all_txt, scale.reshape(()), None if bias is None else bias.reshape(()), offset, chunk_size
    )


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

LOSS_REGISTRY: dict[str, type[_DataParallelLoss] | str] = {
    "clip": ContrastiveLoss,
    "siglip": SigLipLoss,
    "chunked": ChunkedContrastiveLoss,
    "fused": "lilt_ds.ops.contrastive:FusedContrastiveLoss",  # looked up when asked for (it builds kernels)
}
"""``loss.type`` -> the loss class, or ``"module:Class"`` of one that is imported only when it is used."""


def loss_class(loss_type: str) -> type[_DataParallelLoss]:
    """The class registered for ``loss_type`` (``loss.type``), importing a deferred one."""
    if loss_type not in LOSS_REGISTRY:
        raise ConfigError(
            f"unknown loss type {loss_type!r}; allowed types: {', '.join(sorted(LOSS_REGISTRY))} (loss.type)"
        )
    entry = LOSS_REGISTRY[loss_type]
    if isinstance(entry, str):
        import importlib

        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def loss_options(loss_type: str) -> set[str]:
    """The options (constructor arguments) a loss type takes."""
    return {name for name in inspect.signature(loss_class(loss_type).__init__).parameters if name != "self"}


def loss_arguments(loss_cfg: LossSettings | Mapping | None = None) -> tuple[str, dict]:
    """``(type, constructor arguments)`` of the ``loss`` section (typed, or a mapping of its keys), checked.

    The section lists the options of every type: those the type does not take are left out while
    they keep their default; a changed one is an error (it would do nothing), as is local_loss
    without gather_with_grad.
    """
    settings = as_section(LossSettings, loss_cfg, "loss")
    loss_type, accepted, defaults = settings.type, loss_options(settings.type), LossSettings()
    arguments = {}
    for f in user_fields(LossSettings):
        key, value = f.name, getattr(settings, f.name)
        if key == "type":
            continue
        if key in accepted:
            arguments[key] = value
        elif value != getattr(defaults, key):
            takers = sorted(t for t in LOSS_REGISTRY if key in loss_options(t))
            raise ConfigError(
                f"loss.{key}={value!r} is an option of loss.type {' or '.join(takers)}, not {loss_type}: "
                f"set loss.type={takers[0]}, or leave loss.{key} at its default"
            )
    if arguments.get("local_loss", True) and arguments.get("gather_with_grad", True) is False:
        raise ConfigError(
            "loss.local_loss=true with loss.gather_with_grad=false drops the gradient other ranks' rows send "
            "to this rank's features (wrong gradients with more than one rank): set loss.gather_with_grad=true "
            "(or loss.local_loss=false)"
        )
    return loss_type, arguments


def build_loss(loss_cfg: LossSettings | Mapping | None = None) -> _DataParallelLoss:
    """The loss of the ``loss`` section: ``loss.type`` looked up in the registry, with its options
    (see :func:`loss_arguments`). Nothing is dropped silently."""
    loss_type, arguments = loss_arguments(loss_cfg)
    return loss_class(loss_type)(**arguments)


# --------------------------------------------------------------------------------------------------
# Exact gradient accumulation
# --------------------------------------------------------------------------------------------------


def exact_accumulation_step(
    model: Callable[..., Sequence[torch.Tensor]],
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    before_backward: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Accumulate k micro-batches so the gradient equals that of ONE batch of their concatenation.

    OpenCLIP's accum_freq method: encode every micro-batch under no_grad and cache the features;
    then for each micro-batch i, re-encode it with grad, splice its features into the cached ones
    (original order), compute ``loss_fn`` on the whole concatenation (gathered across ranks as
    usual) and call ``backward(loss_i)``. Each feature gets its gradient exactly once; no division
    by k. The scale/bias outputs enter all k losses, so their gradient is scaled by 1/k in each pass
    (value unchanged) and sums to exactly one copy. Returns the detached loss of the full batch.

    Each re-encode restores the RNG state its cached pass started from, so dropout draws the same
    masks in both passes; train-mode BatchNorm (statistics of the batch) would still differ.
    ``backward`` is e.g. ``lambda loss: (engine.backward(loss, scale_wrt_gas=False), engine.step())``
    or ``lambda loss: loss.backward()``. ``before_backward(loss)`` sees the first loss (already the
    full batch's value) before anything is back-propagated: it may raise to skip the step.
    """
    if not micro_batches:
        raise ValueError("exact_accumulation_step needs at least one micro-batch")

    def encode(batch: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        return encode_batch(model, batch)

    rng_before = []  # each re-encode replays its cached pass's randomness (dropout) exactly
    cached = []
    with torch.no_grad():
        for batch in micro_batches:
            rng_before.append(torch_rng_state(batch["input_ids"].device))
            cached.append(tuple(encode(batch)[:2]))
    cached_img = [img for img, _ in cached]
    cached_txt = [txt for _, txt in cached]

    k = len(micro_batches)
    loss_value = None
    for i, batch in enumerate(micro_batches):
        set_torch_rng_state(rng_before[i])
        image_emb, text_emb, *scalars = encode(batch)
        images = torch.cat(cached_img[:i] + [image_emb] + cached_img[i + 1 :])
        texts = torch.cat(cached_txt[:i] + [text_emb] + cached_txt[i + 1 :])
        loss = loss_fn(images, texts, *(scale_gradient(p, 1.0 / k) for p in scalars))
        if i == 0 and before_backward is not None:
            before_backward(loss)
        backward(loss)
        loss_value = loss.detach()
    return loss_value
