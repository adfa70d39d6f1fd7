"""Checks that need a CUDA device (``pytest -m gpu``; deselected by default, CI has no GPU).

They cover what the CPU suite cannot: bf16 autocast on CUDA with the sampler still in fp32, fused
attention kernels for every attention call (flash for the bf16 backbone, memory-efficient for the fp32
sampler), and pre-training through the CUDA DeepSpeed accelerator with NCCL: a run, a bf16 resume,
ZeRO-3 with CPU offload.
"""

import pytest
import torch

from adamae_scale.metrics import read_metrics
from adamae_scale.models import build_model, config_for

from .conftest import TINY_RUN, cli_env, run_pretrain

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on a GPU machine with -m gpu)")
    return torch.device("cuda")


def small_video_model(cuda, **overrides):
    cfg = config_for("vit_small", num_frames=8, img_size=112, **overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg).to(cuda)


def record_output_dtype(seen: dict[str, torch.dtype], name: str):
    def hook(module, inputs, output) -> None:  # a hook returning a value would replace the output
        seen.setdefault(name, output.dtype)

    return hook


def test_bf16_backbone_with_fp32_sampler_on_cuda(cuda):
    cfg, model = small_video_model(cuda)
    video = torch.randn(4, 3, cfg.num_frames, *cfg.img_size, device=cuda)
    seen: dict[str, torch.dtype] = {}
    hooks = [
        model.encoder.blocks[0].attn.qkv.register_forward_hook(record_output_dtype(seen, "encoder")),
        model.sampler.head.register_forward_hook(record_output_dtype(seen, "sampler")),
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(video)
    for hook in hooks:
        hook.remove()
    assert seen == {"encoder": torch.bfloat16, "sampler": torch.float32}
    assert out.logits.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    # The per-clip distribution sums to one in fp32 (bf16 would be off by ~1e-2 over ~800 tokens).
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(4, device=cuda), atol=1e-5)


def test_attention_runs_on_fused_kernels(cuda):
    """bf16 encoder/decoder attention on the flash kernel, the fp32 sampler's on memory-efficient
    attention: a layout that forced SDPA's math fallback (masks, odd strides) would fail here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, model = small_video_model(cuda)
    video = torch.randn(2, 3, cfg.num_frames, *cfg.img_size, device=cuda)
    mask = model(video).mask
    sampler = model.sampler
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # flash has no fp32 kernel
            logits = model.sample_logits(model.encoder.patch_embed(video))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model.sampler = None  # the backbone alone, on the mask the sampler drew
            out = model(video, mask=mask)
        (out.pred.float().square().mean() + logits.square().mean()).backward()
    assert all(p.grad is not None for p in [*model.parameters(), *sampler.parameters()])


def test_bf16_loss_matches_fp32_on_cuda(cuda):
    from adamae_scale.losses import adamae_loss

    cfg, model = small_video_model(cuda)
    video = torch.randn(2, 3, cfg.num_frames, *cfg.img_size, device=cuda)
    mask = model(video).mask  # the same mask for both precisions

    def loss(autocast: bool) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(video, mask=mask)
        return adamae_loss(video, out.pred, out.masked_idx, out.log_probs, cfg.tubelet_size, cfg.patch_size)["loss_rec"]

    fp32, bf16 = loss(False).item(), loss(True).item()
    assert abs(bf16 - fp32) / fp32 < 2e-2


def test_pretrain_on_cuda_with_nccl(cuda, tmp_path):
    proc = run_pretrain(
        *TINY_RUN,
        "precision=bf16",
        "train.steps=20",
        "train.log_every=1",
        f"run_dir={tmp_path}",
        timeout=600,
        env=cli_env(DS_ACCELERATOR="cuda"),
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 20
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"], proc.stdout[-2000:]
    # Peak memory is read from the CUDA allocator, not the host RSS.
    assert 0 < records[-1]["mem_peak_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert (tmp_path / "checkpoints" / "latest").is_file()


def gpu_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_bf16_resume_on_cuda_follows_the_uninterrupted_run(cuda, tmp_path):
    """Stopped at step 4 and resumed: the same losses as a run never stopped, to bf16 kernel noise."""
    common = [*TINY_RUN, "precision=bf16", "ds=zero1", "train.steps=8", "eval.focus_batches=0", "train.log_every=1"]
    env = cli_env(DS_ACCELERATOR="cuda")
    run_pretrain(*common, "train.ckpt_every=0", f"run_dir={tmp_path / 'straight'}", timeout=600, env=env)
    stopped = tmp_path / "stopped"
    run_pretrain(*common, "train.ckpt_every=4", "train.stop_after=4", f"run_dir={stopped}", timeout=600, env=env)
    run_pretrain(*common, "train.ckpt_every=4", f"run_dir={stopped}", timeout=600, env=env)
    straight, resumed = gpu_losses(tmp_path / "straight"), gpu_losses(stopped)
    assert len(resumed) == len(straight) == 8
    # GPU reductions (atomics in attention backward) are not bitwise repeatable: 1e-3 relative in bf16.
    assert torch.allclose(torch.tensor(resumed), torch.tensor(straight), rtol=1e-3), (resumed, straight)


def test_zero3_offload_on_cuda_trains(cuda, tmp_path):
    """Parameters and optimizer states in host memory, DeepSpeed's CPU Adam, compute on the GPU."""
    run_dir = tmp_path / "offload"
    run_pretrain(
        *TINY_RUN,
        "precision=bf16",
        "ds=zero3_offload",
        "train.steps=12",
        "train.log_every=1",
        f"run_dir={run_dir}",
        timeout=900,
        env=cli_env(DS_ACCELERATOR="cuda"),
    )
    losses = gpu_losses(run_dir)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]
