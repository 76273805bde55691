"""JIT build of the kernels/ sources and the choice between a fused kernel and its PyTorch reference.

Per device type: CPU tensors get the C++ kernel (``kernels/``), compiled with ninja by
``torch.utils.cpp_extension.load`` into torch's extensions cache (``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions), so only the first use in an environment pays the compile; CUDA tensors
get the Triton kernel (:mod:`lilt_ds.ops.triton_contrastive`, compiled by Triton on first use).

``LILT_DS_KERNELS`` picks the implementation: ``reference`` never builds; ``fused`` must build the
kernel of the tensors' device (failure raises :class:`KernelBuildError`); ``triton`` runs the
Triton kernel for every device, on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
slow: for tests); unset tries the device's kernel and falls back to the reference. Either way ONE
log line per device type says which implementation runs and why.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import LiltError
from ..runtime import announced_build

log = logging.getLogger("lilt_ds")


def kernel_sources() -> Path:
    """The C++ sources: shipped inside the package by a wheel install (setup.py copies them), else
    the checkout's kernels/ beside the package (an editable install)."""
    shipped = Path(__file__).resolve().parent / "kernels"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "kernels"


KERNELS_DIR = kernel_sources()
ENV_SWITCH = "LILT_DS_KERNELS"
CHOICES = ("reference", "fused", "triton")


class KernelBuildError(LiltError, RuntimeError):
    """A fused kernel was required (LILT_DS_KERNELS=fused|triton) but cannot be built or loaded."""


@dataclass(frozen=True)
class OpSpec:
    """One fused op: its extension name, C++ sources, Triton module and the reference it falls back to."""

    name: str
    cpu_sources: tuple[str, ...]
    triton_module: str
    reference: str


OPS = {
    "contrastive": OpSpec(
        name="lilt_ds_fused_contrastive",
        cpu_sources=("fused_contrastive.cpp",),
        triton_module="lilt_ds.ops.triton_contrastive",
        reference="PyTorch chunked loss (lilt_ds.losses.chunked_clip_loss_fn)",
    ),
}


@dataclass(frozen=True)
class Selection:
    """What runs for one op on one device type: the loaded kernels (None for the reference), which
    kind they are (``fused`` = C++, ``triton``, ``reference``) and a one-line reason."""

    op: str
    module: ModuleType | None
    description: str
    seconds: float = 0.0
    kind: str = "reference"

    @property
    def fused(self) -> bool:
        return self.module is not None


def requested_choice() -> str | None:
    """LILT_DS_KERNELS as reference|fused|triton, or None when unset (automatic)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENV_SWITCH}={value!r} is not valid: use one of {', '.join(CHOICES)} (or leave it unset)")
    return value


def build_extension(op: str, verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) one op's C++ extension; raises whatever the build raises."""
    spec = OPS[op]
    sources = [KERNELS_DIR / s for s in spec.cpu_sources]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)} (a source checkout is needed)")
    from torch.utils.cpp_extension import load

    with announced_build(spec.name, f"the fused {op} loss's C++ kernel"):
        return load(
            name=spec.name,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )


def load_triton(op: str, device_type: str) -> ModuleType:
    """The op's Triton kernels, for CUDA tensors or (under TRITON_INTERPRET=1) CPU tensors."""
    import importlib

    module = importlib.import_module(OPS[op].triton_module)
    if device_type == "cpu" and not module.INTERPRETED:
        raise RuntimeError(
            "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
            "before the process starts (the kernels are made when their module is imported)"
        )
    if device_type == "cuda" and module.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the Triton kernels were made for the interpreter, not the GPU")
    return module


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


@functools.cache
def select(op: str, device_type: str = "cpu") -> Selection:
    """The implementation ``op`` runs on tensors of ``device_type`` in this process (decided once, logged once)."""
    spec = OPS[op]
    choice = requested_choice()
    if choice == "reference":
        kind = "reference"
    elif choice == "triton" or device_type == "cuda":
        kind = "triton"
    elif device_type == "cpu":
        kind = "fused"
    elif choice == "fused":
        raise KernelBuildError(
            f"{ENV_SWITCH}=fused but no fused {op} kernel exists for {device_type} tensors "
            f"(C++ for the CPU, Triton for CUDA): unset {ENV_SWITCH} to use the reference"
        )
    else:
        kind = "reference"
    if kind == "reference":
        why = f"{ENV_SWITCH}=reference" if choice == "reference" else f"no fused kernel for {device_type} tensors"
        selection = Selection(op, None, f"{spec.reference} ({why})")
    else:
        started = time.perf_counter()
        try:
            module = load_triton(op, device_type) if kind == "triton" else build_extension(op)
        except Exception as error:  # a compiler, ninja, import or loader failure: all mean "no fused kernel"
            what = "Triton kernel" if kind == "triton" else "C++ kernel"
            if choice is not None:
                fix = (
                    "install triton (it comes with torch's CUDA build)"
                    if kind == "triton"
                    else "install a C++ compiler and ninja"
                )
                raise KernelBuildError(
                    f"{ENV_SWITCH}={choice} but the {what} of the fused {op} loss cannot be used on {device_type} "
                    f"tensors ({_reason(error)}); {fix}, or set {ENV_SWITCH}=reference"
                ) from error
            selection = Selection(op, None, f"{spec.reference} ({what} unavailable: {_reason(error)})")
        else:
            where = "Triton's interpreter" if kind == "triton" and device_type == "cpu" else device_type
            name = module.__name__ if kind == "fused" else f"{module.__name__} (Triton)"
            selection = Selection(op, module, f"fused {where} kernel {name}", time.perf_counter() - started, kind)
    log.info("lilt_ds.ops: %s on %s tensors runs the %s", op, device_type, selection.description)
    return selection
