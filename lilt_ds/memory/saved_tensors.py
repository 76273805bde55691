"""Counting the bytes autograd saves for backward: the instrument behind every activation figure."""

from __future__ import annotations

import torch


class _SaveInput(torch.autograd.Function):
    """Saves its input for backward and returns nothing useful: shows a tensor to the active saved-tensor hook."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.save_for_backward(tensor)
        return tensor.new_empty(0)

    @staticmethod
    def backward(ctx, grad):
        return None


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward inside ``with meter:`` (parameters excluded).

    A saved view keeps its whole storage alive, so storages are counted, each once; references
    to them are held until the meter is dropped so that no address is reused meanwhile.
    Non-reentrant activation checkpointing hides what its blocks save (its own hooks take
    precedence) and shows their inputs: exactly what stays in memory.

    ``note_linear_input`` answers a second question in the same pass: what ZeRO-3 would keep
    besides. Its replacement of F.linear saves a linear layer's input even when the weight is
    frozen (plain autograd then keeps only the weight); ``zero3_linear_bytes`` adds those inputs.

    ``backward=False`` for a pass that is never backpropagated: the graph then keeps detached
    aliases, so that it dies with its outputs. (A saved output handed back as is ties output and
    graph in a cycle that Python's collector cannot see; only a backward pass breaks it.)
    """

    def __init__(self, parameters, backward: bool = True):
        self._param_ids = {id(p) for p in parameters}
        self._backward = backward
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._frozen_linear_inputs: dict[int, torch.UntypedStorage] = {}
        self._target = self._storages
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values())

    @property
    def zero3_linear_bytes(self) -> int:
        union = {**self._frozen_linear_inputs, **self._storages}
        return sum(s.nbytes() for s in union.values())

    def note_linear_input(self, tensor: torch.Tensor, weight: torch.Tensor) -> None:
        """Call from F.linear: an input ZeRO-3 would save and autograd does not (through the active hook,
        so that inside a checkpointed block it is not counted, as there it would not be kept)."""
        if torch.is_grad_enabled() and tensor.requires_grad and not weight.requires_grad:
            self._target = self._frozen_linear_inputs
            try:
                _SaveInput.apply(tensor)
            finally:
                self._target = self._storages

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        while tensor is not None:
            if id(tensor) in self._param_ids:
                return True
            tensor = tensor._base
        return False

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._is_parameter(tensor):
            return tensor  # as is: ZeRO-3 finds its partitioned parameters by their attributes
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.nbytes():
                self._target.setdefault(storage.data_ptr(), storage)
        return tensor if self._backward else tensor.detach()

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
