"""Gumbel-top-k sampling, masking strategies and the sampler's fp32 island."""

import torch

from adamae_scale.models import build_model, config_for
from adamae_scale.models.masking import TokenLayout, gumbel_top_k, num_visible_tokens, sample_mask, split_indices
from adamae_scale.models.sampler import TokenSampler, token_log_probs


def inclusion_frequencies(draw, n: int, trials: int) -> torch.Tensor:
    counts = torch.zeros(n)
    for idx in draw(trials):
        counts.index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
    return counts / trials


def test_gumbel_top_k_matches_multinomial_without_replacement():
    """Per-token inclusion probabilities of a k-subset drawn without replacement are not p*k: both
    samplers must agree on them (a with-replacement or plain top-k sampler would not)."""
    torch.manual_seed(0)
    n, k, trials = 12, 4, 40_000
    logits = torch.randn(n) * 1.5
    probs = torch.softmax(logits, dim=0)
    gen = torch.Generator().manual_seed(1)

    gumbel = inclusion_frequencies(
        lambda t: [gumbel_top_k(logits.expand(t, n), k, torch.rand(t, n, generator=gen))], n, trials
    )
    multinomial = inclusion_frequencies(
        lambda t: [torch.multinomial(probs.expand(t, n), k, replacement=False, generator=gen)], n, trials
    )
    with_replacement = inclusion_frequencies(
        lambda t: [torch.multinomial(probs.expand(t, n), k, replacement=True, generator=gen)], n, trials
    )

    # Standard error of a frequency over 40k trials is <= 0.0025; 0.012 is ~5 sigma of the difference.
    assert (gumbel - multinomial).abs().max() < 0.012
    # The test has power: a wrong sampler (with replacement) is far outside that tolerance.
    assert (with_replacement - multinomial).abs().max() > 0.05
    assert torch.allclose(gumbel.sum(), torch.tensor(float(k)))


def test_masks_have_the_configured_number_of_visible_tokens():
    layout = TokenLayout((8, 14, 14))
    assert num_visible_tokens("adaptive", layout, 0.95) == 78  # ADAMAE.md: 78 of 1568
    for strategy in ("adaptive", "random", "tube"):
        visible = num_visible_tokens(strategy, layout, 0.9)
        logits = torch.randn(3, layout.num_tokens)
        mask = sample_mask(strategy, layout, visible, 3, torch.device("cpu"), logits)
        assert mask.shape == (3, 1568)
        assert ((~mask).sum(1) == visible).all()
        vis, masked = split_indices(mask)
        assert torch.all(vis[:, 1:] > vis[:, :-1]) and torch.all(masked[:, 1:] > masked[:, :-1])


def test_tube_masking_masks_the_same_positions_in_every_frame():
    layout = TokenLayout((4, 6, 6))
    visible = num_visible_tokens("tube", layout, 0.75)
    mask = sample_mask("tube", layout, visible, 2, torch.device("cpu")).view(2, 4, 36)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert not torch.equal(mask[0], mask[1])


def test_sampler_runs_in_fp32_under_bf16_autocast_with_extreme_inputs():
    torch.manual_seed(0)
    sampler = TokenSampler(dim=64, num_tokens=32, num_heads=8)
    tokens = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    tokens[0, :4] = 1.0e4  # activations far outside the usual range, stored in bf16
    tokens[1, :4] = -1.0e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = sampler(tokens)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()

    extreme = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4]], requires_grad=True)
    log_probs = token_log_probs(extreme)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    idx = gumbel_top_k(extreme, 2)
    assert idx.shape == (2, 2)
    log_probs.sum().backward()
    assert torch.isfinite(extreme.grad).all()


def test_model_backbone_bf16_and_sampler_fp32():
    cfg = config_for("vit_tiny", num_frames=4, img_size=[32, 48], patch_size=8, depth=2, decoder_depth=1)
    model = build_model(cfg)
    video = torch.randn(2, 3, 4, 32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(video)
    assert out.pred.dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.sampler.parameters())
    assert torch.isfinite(out.log_probs).all()


def _matmul_dtypes(module: torch.nn.Module, run) -> set[torch.dtype]:
    """The output dtypes of every nn.Linear inside ``module`` during ``run()``."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    run()
    for hook in hooks:
        hook.remove()
    return seen


def test_sampler_precision_bf16_runs_the_block_in_bf16_and_keeps_the_logits_fp32():
    torch.manual_seed(0)
    fp32 = TokenSampler(dim=64, num_tokens=32, num_heads=8, dropout=0.0)
    bf16 = TokenSampler(dim=64, num_tokens=32, num_heads=8, dropout=0.0, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        fp32.pos_embed_probs.normal_()
        bf16.pos_embed_probs.copy_(fp32.pos_embed_probs)
    tokens = torch.randn(2, 32, 64)

    block_dtypes = _matmul_dtypes(bf16.block, lambda: bf16(tokens))
    assert block_dtypes == {torch.bfloat16}  # the block's matmuls ran in bf16 ...
    assert _matmul_dtypes(bf16.head, lambda: bf16(tokens)) == {torch.float32}  # ... the head did not
    assert _matmul_dtypes(fp32, lambda: fp32(tokens)) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 default stays fp32 inside a bf16 backbone
        assert _matmul_dtypes(fp32, lambda: fp32(tokens)) == {torch.float32}

    reference, cheap = fp32(tokens), bf16(tokens)
    assert cheap.dtype == torch.float32
    assert not torch.equal(reference, cheap)
    torch.testing.assert_close(cheap, reference, atol=0.05, rtol=0.05)  # bf16's 8-bit mantissa, not a bug
    cheap.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters())


def test_sampler_precision_tf32_equals_fp32_on_the_cpu_and_bad_values_are_refused():
    torch.manual_seed(0)
    fp32 = TokenSampler(dim=64, num_tokens=32, num_heads=8, dropout=0.0)
    tf32 = TokenSampler(dim=64, num_tokens=32, num_heads=8, dropout=0.0, precision="tf32")
    tf32.load_state_dict(fp32.state_dict())
    tokens = torch.randn(2, 32, 64)
    assert torch.equal(fp32(tokens), tf32(tokens))  # CPUs have no TF32: the fp32 result, bit for bit
    try:
        config_for("vit_tiny", sampler_precision="fp16")
    except ValueError as err:
        assert "model.sampler_precision" in str(err) and "fp16" in str(err)
    else:
        raise AssertionError("sampler_precision=fp16 was accepted")
