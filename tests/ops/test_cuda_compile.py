"""The CUDA source compiles with nvcc (compile only: no GPU is needed; the object is cached by source hash)."""

import hashlib
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from lilt_ds.ops.builder import KERNELS_DIR

CUDA_SOURCE = KERNELS_DIR / "fused_contrastive_cuda.cu"


def nvcc_path():
    home = cpp_extension.CUDA_HOME
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else shutil.which("nvcc")


def test_cuda_source_compiles_with_nvcc():
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine: the CUDA source cannot be compiled")
    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    flags = ["-c", "-std=c++20", "-O3", "-arch=sm_80", "--expt-relaxed-constexpr",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=check",
             *(f"-I{path}" for path in [*includes, sysconfig.get_paths()["include"]])]
    key = hashlib.sha256(CUDA_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(cpp_extension._get_build_directory("lilt_ds_nvcc_check", verbose=False))
    obj = cache / f"fused_contrastive_cuda.{key}.o"
    if obj.is_file():
        return  # this exact source compiled before
    result = subprocess.run([nvcc, *flags, str(CUDA_SOURCE), "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    assert obj.stat().st_size > 0
