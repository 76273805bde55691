"""JIT build of the kernels/ sources and the choice between a fused kernel and its PyTorch reference.

Sources are compiled with ninja by ``torch.utils.cpp_extension.load`` into torch's extensions
cache (``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions), so only the first use in an
environment pays the compile. The CUDA source joins the build only where torch sees a GPU.

``LILT_DS_KERNELS`` picks the implementation: ``reference`` never builds, ``fused`` must build
(failure raises :class:`KernelBuildError`), unset tries the fused build and falls back to the
reference. Either way ONE log line says which implementation runs and why.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("lilt_ds")

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
"""The C++ / CUDA sources (a sibling of the package in a source checkout)."""
ENV_SWITCH = "LILT_DS_KERNELS"
CHOICES = ("reference", "fused")


class KernelBuildError(RuntimeError):
    """The fused kernels were required (LILT_DS_KERNELS=fused) but cannot be built or loaded."""


@dataclass(frozen=True)
class OpSpec:
    """One fused op: its extension name, sources (CPU, CUDA) and the reference it falls back to."""

    name: str
    cpu_sources: tuple[str, ...]
    cuda_sources: tuple[str, ...]
    reference: str


OPS = {
    "contrastive": OpSpec(
        name="lilt_ds_fused_contrastive",
        cpu_sources=("fused_contrastive.cpp",),
        cuda_sources=("fused_contrastive_cuda.cu",),
        reference="PyTorch chunked loss (lilt_ds.losses.chunked_clip_loss_fn)",
    ),
}


@dataclass(frozen=True)
class Selection:
    """What runs for one op: the loaded extension (None for the reference) and a one-line reason."""

    op: str
    module: ModuleType | None
    description: str
    seconds: float = 0.0

    @property
    def fused(self) -> bool:
        return self.module is not None


def requested_choice() -> str | None:
    """LILT_DS_KERNELS as reference|fused, or None when unset (automatic)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENV_SWITCH}={value!r} is not valid: use one of {', '.join(CHOICES)} (or leave it unset)")
    return value


def build_extension(op: str, with_cuda: bool | None = None, verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) one op's extension; raises whatever the build raises."""
    spec = OPS[op]
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    sources = [KERNELS_DIR / s for s in spec.cpu_sources + (spec.cuda_sources if with_cuda else ())]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)} (a source checkout is needed)")
    from torch.utils.cpp_extension import load

    return load(
        name=spec.name + ("_cuda" if with_cuda else ""),
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3"],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        verbose=verbose,
    )


@functools.lru_cache(maxsize=None)
def select(op: str) -> Selection:
    """The implementation ``op`` runs in this process (decided once, logged once)."""
    spec = OPS[op]
    choice = requested_choice()
    where = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "reference":
        selection = Selection(op, None, f"{spec.reference} ({ENV_SWITCH}=reference)")
    else:
        started = time.perf_counter()
        try:
            module = build_extension(op)
        except Exception as error:  # a compiler, ninja or loader failure: all mean "no fused kernel"
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            if choice == "fused":
                raise KernelBuildError(
                    f"{ENV_SWITCH}=fused but the fused {op} kernel cannot be built ({reason}); install a C++ "
                    f"compiler and ninja (and nvcc for GPUs), or set {ENV_SWITCH}=reference"
                ) from error
            selection = Selection(op, None, f"{spec.reference} (fused build failed: {reason})")
        else:
            seconds = time.perf_counter() - started
            selection = Selection(op, module, f"fused {where} kernel {module.__name__}", seconds)
    log.info("lilt_ds.ops: %s runs the %s", op, selection.description)
    return selection
