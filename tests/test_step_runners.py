"""The throughput benchmark compares like with like: our trainer, the plain PyTorch loop and OpenCLIP's
step (benchmarks/step_runners.py) train the same model. Same trainable parameters per mode; in fp32 the same
loss on the same weights and batch, and the same loss again after one optimizer step (same optimizer,
clipping and schedule); in bf16 the same first loss up to bf16 rounding. No timing is asserted."""

import json
import math
import os

import pytest

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("clip", "lit", "lilt")


def _two_steps(rank, world_size, tmp_dir, modes):
    """{mode: {precision: {impl: [params, trainable, loss step 1, loss step 2]}}} on tiny towers."""
    import step_runners as tp
    import torch

    from lilt_ds.engine import load_ds_config

    def config(stage, bf16):  # explicit precision: the shipped files say "auto"
        ds = load_ds_config(os.path.join(ROOT, "ds_configs", f"zero{stage}.json"))
        ds["bf16"] = {"enabled": bf16}
        path = os.path.join(tmp_dir, f"zero{stage}_{'bf16' if bf16 else 'fp32'}.json")
        with open(path, "w") as f:
            json.dump(ds, f)
        return path

    bf16_path = config(2, True)
    fp32_paths = {stage: config(stage, False) for stage in (0, 2)}
    torch.set_num_threads(1)  # the 2-core CI machine: one thread each is as fast and less noisy
    results = {}
    for mode in modes:
        cfg = tp.benchmark_config(
            "tiny",
            mode,
            image_size=64,
            batch=4,
            workers=0,
            total_steps=20,
            demo={"n": 16, "eval_n": 4, "seed": 0, "size": 32},
            extra=["train.warmup_steps=2", "train.epochs=10", "data.augment.randaugment=false"],
        )
        batch = tp.synthetic_batch(cfg, 4)
        precisions = {"fp32": (fp32_paths[2], None)}
        if mode == "clip":
            precisions["bf16"] = (bf16_path, torch.bfloat16)
        results[mode] = {}
        for precision, (ds_path, autocast) in precisions.items():
            runners = {
                "ours": lambda: tp.OursStep(
                    cfg,
                    ds_path,
                    output_dir=os.path.join(tmp_dir, f"{mode}-{precision}"),
                    prepare_model=tp.zero_text_projection_bias,
                ),
                # ZeRO-0 on one rank skips DeepSpeed's gradient all-reduce (lilt_ds.engine.initialize)
                "ours_zero0": lambda: tp.OursStep(
                    cfg,
                    fp32_paths[0],
                    output_dir=os.path.join(tmp_dir, f"{mode}-z0"),
                    prepare_model=tp.zero_text_projection_bias,
                ),
                "plain": lambda: tp.PlainStep(cfg, autocast_dtype=autocast, prepare_model=tp.zero_text_projection_bias),
                "openclip": lambda: tp.OpenClipStep(
                    cfg, autocast_dtype=autocast, prepare_model=tp.zero_text_projection_bias
                ),
            }
            results[mode][precision] = {}
            for impl, make in runners.items():
                if impl == "ours_zero0" and (mode, precision) != ("clip", "fp32"):
                    continue
                runner = make()
                losses = []
                for step in range(2):
                    torch.manual_seed(step)  # the same dropout masks for every implementation
                    losses.append(float(runner.step(batch)))
                results[mode][precision][impl] = [*runner.counts(), *losses]
                runner.close()
    return results


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    pytest.importorskip("open_clip", reason="needs open_clip_torch: pip install -e .[test]")
    tmp = tmp_path_factory.mktemp("throughput")
    return run_ranks(_two_steps, 1, tmp, str(tmp), MODES)[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_three_implementations_train_the_same_parameters(two_steps, mode):
    counts = {impl: values[:2] for impl, values in two_steps[mode]["fp32"].items()}
    assert counts["ours"] == counts["plain"] == counts.get("ours_zero0", counts["ours"])
    embed_dim = 256  # OpenCLIP's text projection has no bias: exactly embed_dim parameters fewer
    assert counts["openclip"] == [counts["ours"][0] - embed_dim, counts["ours"][1] - embed_dim]
    total, trainable = counts["ours"]
    assert (trainable == total) == (mode == "clip")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_same_weights_and_batch_give_the_same_loss_before_and_after_a_step_in_fp32(two_steps, mode):
    losses = {impl: values[2:] for impl, values in two_steps[mode]["fp32"].items()}
    first, second = losses["ours"]
    assert math.isfinite(first) and math.isfinite(second) and second != first
    for impl in ("plain", "openclip") + (("ours_zero0",) if mode == "clip" else ()):
        assert losses[impl][0] == pytest.approx(first, rel=1e-5), impl
        assert losses[impl][1] == pytest.approx(second, rel=1e-4), impl


@pytest.mark.slow
def test_bf16_first_losses_agree_up_to_bf16_rounding(two_steps):
    losses = {impl: values[2] for impl, values in two_steps["clip"]["bf16"].items()}
    reference = two_steps["clip"]["fp32"]["ours"][2]
    for impl, loss in losses.items():
        assert loss == pytest.approx(reference, rel=3e-2), impl


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40 Super", None),
        ("NVIDIA H100 96GB", None),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_flops_need_the_exact_device_name_else_unknown(monkeypatch, name, peak):
    """A substring match gave the H100 NVL the SXM's 989 TF and the L40 the L4's figure."""
    import step_runners as tp
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert tp.peak_flops(torch.device("cuda", 0)) == peak
    assert tp.peak_flops(torch.device("cpu")) is None
