"""adamae-bench step: timed optimizer steps of the real engine, with the FLOPs they execute and the limits
measured beside them (plain torch, matmul peak, breakdown, random masking)."""

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from adamae_scale.bench import flops
from adamae_scale.bench.flops import attention_flops, flop_counter
from adamae_scale.bench.step import BREAKDOWN_PARTS
from adamae_scale.engine import setup
from adamae_scale.models import build_model, config_for

from .conftest import REPO, TINY_MODEL, cli_env, one_line_error, torchrun_cmd

TINY = [*TINY_MODEL, "train.micro_batch_size=4"]


def attention_fwd_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """QK^T and PV: two matmuls of 2·Nq·Nk·Dh FLOPs per head."""
    return 4 * batch * heads * queries * keys * head_dim


def close(a: float, b: float, rel: float = 1e-2) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_bench_step_on_two_zero3_ranks_counts_forward_backward_and_recompute():
    cmd = torchrun_cmd(
        2,
        *TINY,
        "ds=zero3",
        "model.checkpoint_every=1",
        "steps=3",
        "warmup=1",
        "compare_random=true",
        target=("-m", "adamae_scale.bench", "step"),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 reports
    report = reports[0]
    cfg = config_for(
        "vit_tiny", depth=2, decoder_depth=1, num_frames=4, img_size=[32, 32], patch_size=8, mask_ratio=0.75
    )
    with torch.device("meta"):
        assert report["params"] == build_model(cfg).num_params()  # the full model, not one ZeRO-3 shard
    assert (report["world_size"], report["micro_batch_size"], report["steps_timed"]) == (2, 4, 3)
    assert abs(report["clips_per_s"] - 8 / report["seconds_per_step"]) < 1e-2 * report["clips_per_s"]
    assert torch.isfinite(torch.tensor(report["loss"]))

    # A training step executes about 3x the forward FLOPs (backward = 2x), plus one more forward of
    # each checkpointed block: the count must land between the two.
    torch.manual_seed(0)
    model = build_model(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 3, 4, 32, 32))
    forward_tflop = counter.get_total_flops() / 1e12
    assert 2.5 * forward_tflop < report["model_tflop_per_step_per_rank"] < 4.5 * forward_tflop

    # Attention is counted on the CPU too, exactly: forward + backward (2.5x) of the sampler's block over all
    # tokens, the encoder's over the visible ones and the decoder's over all, plus the checkpointed encoder and
    # decoder blocks' forward again.
    n, v = cfg.num_tokens, cfg.num_visible
    encoder = cfg.depth * attention_fwd_flops(4, 1, v, v, cfg.embed_dim)
    decoder = cfg.decoder_depth * attention_fwd_flops(4, 1, n, n, cfg.decoder_embed_dim)
    sampler = attention_fwd_flops(4, 1, n, n, cfg.embed_dim)
    attention = 3.5 * (sampler + encoder + decoder) + encoder + decoder
    assert close(report["attention_tflop_per_step_per_rank"], attention / 1e12, 1e-3)
    assert report["attention_tflop_per_step_per_rank"] < report["model_tflop_per_step_per_rank"]

    # The limits measured in the same run.
    seconds = report["seconds_per_step"]
    for key in ("baseline_seconds_per_step", "peak_tflops", "mfu", "random_seconds_per_step"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["peak_dtype"] == "bf16" and report["precision"] == "bf16"
    native = setup.native_bf16("cpu")  # an AVX2-only CPU emulates bf16: the run says so once, on rank 0
    assert report["native_bf16"] is native
    assert proc.stderr.count("[adamae] warning: precision=bf16 on this CPU") == (0 if native else 1)
    assert close(report["engine_overhead"], seconds / report["baseline_seconds_per_step"])
    assert close(report["mfu"], report["tflops_per_s_per_rank"] / report["peak_tflops"])
    assert close(report["adaptive_over_random"], seconds / report["random_seconds_per_step"])
    breakdown = report["breakdown"]
    assert list(breakdown) == list(BREAKDOWN_PARTS) and all(breakdown[p] >= 0 for p in BREAKDOWN_PARTS)
    assert min(breakdown["sampler"], breakdown["encoder"], breakdown["backward"], breakdown["optimizer"]) > 0
    # Timed apart from the main steps (region boundaries synchronise), so only about the step's time.
    assert 0.5 * seconds < sum(breakdown.values()) < 1.3 * seconds


def test_bench_step_reads_mfu_against_the_higher_of_two_peak_measurements():
    """A peak measured in a slow moment of a shared machine would inflate mfu: the bench measures before the timed
    steps and after everything, and keeps the higher."""
    script = (
        "import json, sys\n"
        "from adamae_scale.bench import step\n"
        "peaks, calls = iter([0.5, 0.2]), []\n"
        "step.matmul_peak_tflops = lambda device, dtype: calls.append(dtype) or next(peaks)\n"
        "report = step.measure(sys.argv[1:], step.StepOptions(steps=1, warmup=1, baseline=False, breakdown=False))\n"
        "print(json.dumps({**report, 'peak_calls': [str(d) for d in calls]}))\n"
    )
    cmd = [sys.executable, "-c", script, *TINY, "ds=zero0"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["peak_calls"] == ["torch.bfloat16", "torch.bfloat16"] and report["peak_tflops"] == 0.5
    assert close(report["mfu"], report["tflops_per_s_per_rank"] / 0.5)


def test_cpu_attention_flops_are_counted_as_torch_counts_its_cuda_kernels():
    b, h, nq, nk, d = 2, 3, 12, 20, 8
    q = torch.randn(b, h, nq, d, requires_grad=True)
    k, v = (torch.randn(b, h, nk, d, requires_grad=True) for _ in range(2))
    forward = attention_fwd_flops(b, h, nq, nk, d)
    with flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == attention_flops(counter) == forward
    with flop_counter() as counter:
        out.sum().backward()
    # Backward: QK^T recomputed, then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: five forward-sized matmuls.
    assert counter.get_total_flops() == attention_flops(counter) == 10 * b * h * nq * nk * d == 2.5 * forward

    # The same numbers torch's own formulas give its CUDA flash-attention kernels for these shapes.
    aten = torch.ops.aten
    cuda_forward = flop_registry[aten._scaled_dot_product_flash_attention](q, k, v, out_val=None)
    cuda_backward = flop_registry[aten._scaled_dot_product_flash_attention_backward](out, q, k, v, out_val=None)
    assert (cuda_forward, cuda_backward) == (forward, 2.5 * forward)


def test_bench_step_rejects_bad_settings_in_one_line(capsys):
    from adamae_scale.bench import main

    for settings, expected in (
        (["model=vit_hug"], "model/vit_hug"),
        (["train.foo=1"], "train.foo"),
        (["steps=0"], "steps=0: expected an integer >= 1"),
        (["warmup=two"], "warmup=two: expected an integer >= 1"),
        (["compare_random=maybe"], "compare_random=maybe: expected true or false"),
        (["baseline=2"], "baseline=2: expected true or false"),
        (["masking=maybe"], "masking/maybe"),
        (["masking.strategy=best"], "masking.strategy must be one of"),
        (["masking=random", "compare_random=true"], "compare_random=true: expected masking=adaptive"),
        (["fast"], "expected key=value"),
    ):
        assert main(["step", *settings]) == 2
        line = one_line_error(capsys.readouterr().err, "adamae-bench")
        assert line.startswith("adamae-bench: error: step: ") and expected in line


def test_matmul_peak_of_a_slow_kernel_is_measured_at_a_size_that_fits_the_budget(monkeypatch):
    """bf16 on an AVX2-only CPU runs ~0.02 TFLOP/s: measured at 2048² the peak took minutes (and held a 2-rank
    bench past its time limit). The CPU size grows from 256² only while the next size fits ~0.25 s."""
    seconds_at_256 = 0.02
    sizes = []

    def slow_linear(a, b):  # a kernel that takes 20 ms at 256² and 8x that per doubling
        sizes.append(a.shape[0])
        time.sleep(seconds_at_256 * (a.shape[0] / 256) ** 3)
        return a

    monkeypatch.setattr(flops, "F", SimpleNamespace(linear=slow_linear))
    peak = flops.matmul_peak_tflops(torch.device("cpu"), torch.bfloat16, reps=2)
    assert sorted(set(sizes)) == [256, 512]  # 256² probed (20 ms, next 160 ms fits), 512² probed and measured
    assert sizes[-3:] == [512, 512, 512]  # one warm-up and two timed repetitions
    assert close(peak, 2 * 512**3 / (8 * seconds_at_256) / 1e12, 0.25)


def test_matmul_peak_of_a_native_kernel_is_measured_at_the_full_cpu_size():
    generator = torch.Generator().manual_seed(0)
    assert flops._cpu_matmul_size(torch.float32, generator, budget_seconds=float("inf")) == 2048
    assert flops._cpu_matmul_size(torch.float32, generator, budget_seconds=0.0) == 256
    assert 0 < flops.matmul_peak_tflops(torch.device("cpu"), torch.float32, size=256, reps=1) < 100
