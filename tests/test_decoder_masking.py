"""Decoder masking (VideoMAE V2's dual masking) and the cheaper sampler blocks: patterns, set sizes, the unbiased
sampling loss, the model's forward, and real runs (ZeRO-3 + activation checkpointing on 2 ranks, exact resume)."""

import json

import numpy as np
import pytest
import torch

from adamae_scale import schema
from adamae_scale.convert.folder import load_model
from adamae_scale.losses import adamae_loss, sampling_loss
from adamae_scale.metrics import read_metrics
from adamae_scale.models import build_model, config_for
from adamae_scale.models.masking import (
    TokenLayout,
    decoder_targets,
    num_reconstructed_tokens,
    running_cell_pattern,
    sample_mask,
    split_indices,
)
from adamae_scale.models.sampler import TokenSampler
from adamae_scale.visual.panel import compute_panel

from .conftest import TINY_RUN, convert_cli, run_pretrain, run_ranks

GRID = (4, 6, 8)  # (t, h, w) tokens


def small_config(**overrides):
    values = dict(num_frames=8, img_size=[48, 64], patch_size=8, depth=2, decoder_depth=1, mask_ratio=0.75)
    return config_for("vit_tiny", **{**values, **overrides})


def test_running_cell_keeps_two_slots_of_every_cell_and_moves_one_slot_per_frame():
    t, h, w = GRID
    phases = torch.arange(4)
    kept = running_cell_pattern(GRID, phases).view(4, t, h, w)
    cells = kept.view(4, t, h // 2, 2, w // 2, 2)
    assert torch.all(cells.sum(dim=(3, 5)) == 2)  # each 2x2 cell holds 2 reconstructed slots, in every frame
    # Frame t + 1 of phase p is frame t of phase p + 1: the run of kept slots moves one slot per frame.
    for phase in range(3):
        assert torch.equal(kept[phase, 1:], kept[phase + 1, :-1])
    assert not torch.equal(kept[0, 0], kept[0, 1])
    # The two kept slots are neighbours in the cell's cyclic order (0,0) (0,1) (1,1) (1,0), never a diagonal.
    first_cell = cells[..., 0, :, 0, :].reshape(4, t, 4)  # slots in row-major order (0,0) (0,1) (1,0) (1,1)
    diagonal = (first_cell[..., 0] & first_cell[..., 3]) | (first_cell[..., 1] & first_cell[..., 2])
    assert not diagonal.any()
    # Complementary phases keep complementary halves: over the four phases every position is kept twice.
    assert torch.equal(kept[0], ~kept[2]) and torch.equal(kept[1], ~kept[3])
    assert torch.all(kept.sum(0) == 2)


@pytest.mark.parametrize("pattern", ["running_cell", "random"])
def test_every_clip_reconstructs_the_same_number_of_its_own_masked_tokens(pattern):
    layout = TokenLayout(GRID)
    mask = sample_mask("adaptive", layout, 40, 6, torch.device("cpu"), torch.randn(6, layout.num_tokens) * 3)
    num_masked = layout.num_tokens - 40
    count = num_reconstructed_tokens(num_masked, 0.5)
    targets = decoder_targets(mask, GRID, count, pattern)
    assert targets.shape == (6, count) and count == num_masked // 2
    assert torch.all(targets[:, 1:] > targets[:, :-1])  # ascending, no repeats
    assert torch.all(torch.gather(mask, 1, targets))  # only tokens the encoder did not see
    if pattern == "running_cell":
        noise = torch.rand(6, layout.num_tokens + 1)
        targets = decoder_targets(mask, GRID, count, pattern, noise)
        kept = running_cell_pattern(GRID, (noise[:, 0] * 4).long())
        in_cell = torch.gather(kept, 1, targets).sum(1)
        available = (kept & mask).sum(1)
        # The cell's masked tokens come first; only what the cell lacks (or holds beyond count) is filled at random.
        assert torch.equal(in_cell, available.clamp(max=count))


@pytest.mark.parametrize("pattern", ["running_cell", "random"])
def test_the_sampling_loss_over_decoder_targets_is_an_unbiased_estimate_of_the_full_set_loss(pattern):
    """Fixed per-token errors and log-probabilities (the decoder set is drawn independently of the sampler):
    the mean of the subset loss over many decoder masks equals the full-set loss within its sampling error."""
    generator = torch.Generator().manual_seed(0)
    layout = TokenLayout(GRID)
    batch, visible, draws = 4, 30, 4000
    logits = torch.randn(batch, layout.num_tokens, generator=generator) * 2
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = sample_mask("adaptive", layout, visible, batch, torch.device("cpu"), logits)
    _, masked_idx = split_indices(mask)
    # Errors that vary strongly with position, so a biased choice of targets would show.
    error = torch.rand(batch, layout.num_tokens, generator=generator) * torch.linspace(0.1, 3.0, layout.num_tokens)
    full = float(sampling_loss(log_probs, masked_idx, torch.gather(error, 1, masked_idx)))

    count = num_reconstructed_tokens(layout.num_tokens - visible, 0.5)
    noise = torch.rand(draws, batch, layout.num_tokens + 1, generator=generator)
    estimates = []
    for d in range(draws):
        targets = decoder_targets(mask, GRID, count, pattern, noise[d])
        estimates.append(float(sampling_loss(log_probs, targets, torch.gather(error, 1, targets))))
    values = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(values.std() / draws**0.5)
    assert abs(float(values.mean()) - full) < 4 * standard_error, (float(values.mean()), full, standard_error)
    # The test has power: the same-size set of the lowest-index masked tokens (a biased choice) is far off.
    biased = masked_idx[:, :count]
    assert abs(float(sampling_loss(log_probs, biased, torch.gather(error, 1, biased))) - full) > 20 * standard_error


def test_decoder_masking_feeds_the_decoder_visible_plus_target_tokens_only():
    cfg = small_config(decoder_ratio=0.5, decoder_mask="random")
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = []
    model.decoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    video = torch.randn(3, 3, 8, 48, 64)
    out = model(video)
    num_masked = cfg.num_tokens - cfg.num_visible
    assert cfg.num_reconstructed == num_masked - num_masked // 2
    assert seen == [(3, cfg.num_visible + cfg.num_reconstructed, cfg.decoder_embed_dim)]
    assert out.pred.shape == (3, cfg.num_reconstructed, cfg.pixels_per_token)
    assert out.masked_idx.shape == (3, cfg.num_reconstructed)
    assert torch.all(torch.gather(out.mask, 1, out.masked_idx))
    # The sampling loss reaches the sampler through the reconstructed tokens only: gradient on every logit
    # (softmax couples them), and the reconstruction loss sends none.
    losses = adamae_loss(video, out.pred, out.masked_idx, out.log_probs, cfg.tubelet_size, cfg.patch_size)
    grad = torch.autograd.grad(losses["loss_rec"], model.sampler.head.weight, allow_unused=True)[0]
    assert grad is None or torch.count_nonzero(grad) == 0
    (losses["loss_sampling"]).backward()
    assert torch.count_nonzero(model.sampler.head.weight.grad) > 0
    # Keyed decoder noise gives the same targets every time: what exact resume relies on.
    model.eval()  # no sampler dropout: the same logits, so the same encoder mask
    noise, decoder_noise = torch.rand(3, cfg.num_tokens), torch.rand(3, cfg.num_tokens + 1)
    first = model(video, noise=noise, decoder_noise=decoder_noise).masked_idx
    assert torch.equal(first, model(video, noise=noise, decoder_noise=decoder_noise).masked_idx)


def test_decoder_ratio_zero_reconstructs_every_masked_token_with_the_same_numbers():
    """At the default (0) the forward takes the paper's path: the same random draws, predictions and losses as
    a model config that has never heard of decoder masking (an old checkpoint's config.json)."""
    old_style = small_config()
    explicit = small_config(decoder_ratio=0.0, decoder_mask="random")
    video = torch.randn(2, 3, 8, 48, 64)
    results = []
    for cfg in (old_style, explicit):
        torch.manual_seed(0)
        model = build_model(cfg)
        torch.manual_seed(1)  # mask noise and sampler dropout from the global generator
        out = model(video)
        losses = adamae_loss(video, out.pred, out.masked_idx, out.log_probs, cfg.tubelet_size, cfg.patch_size)
        _, masked_idx = split_indices(out.mask)
        assert torch.equal(out.masked_idx, masked_idx)
        results.append((out.pred, losses["loss"], torch.rand(1)))  # the generator advanced equally
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width, pool", [(96, 1), (None, 2), (96, 2)])
def test_cheaper_samplers_give_every_token_its_own_probability(width, pool):
    grid = (2, 4, 6)
    n = 2 * 4 * 6
    torch.manual_seed(0)
    sampler = TokenSampler(192, n, num_heads=8, dropout=0.0, width=width, pool=pool, grid=grid)
    reference = TokenSampler(192, n, num_heads=8, dropout=0.0)
    tokens = torch.randn(3, n, 192)
    logits = sampler(tokens)
    assert logits.shape == (3, n) and logits.dtype == torch.float32
    if pool > 1:
        cells = logits.view(3, 2, 2, pool, 3, pool)  # tokens of one cell still differ
        assert (cells - cells.mean(dim=(3, 5), keepdim=True)).abs().amax() > 0
    flops = {name: _block_flops(module, tokens) for name, module in (("cheap", sampler), ("reference", reference))}
    assert flops["cheap"] * 2 <= flops["reference"], flops
    # The reference sampler's parameters are unchanged, so reference weights load into the default.
    assert sorted(reference.state_dict()) == ["block." + k for k in sorted(reference.block.state_dict())] + [
        "head.bias",
        "head.weight",
        "pos_embed_probs",
    ]


def test_the_key_value_pooled_sampler_attends_over_cell_means_with_the_reference_s_parameters():
    from einops import repeat

    from adamae_scale.bench.flops import attention_flops, flop_counter

    grid, n = (2, 4, 6), 2 * 4 * 6
    torch.manual_seed(0)
    reference = TokenSampler(192, n, num_heads=8, dropout=0.0)
    pooled = TokenSampler(192, n, num_heads=8, dropout=0.0, grid=grid, kv_pool=2)
    # The same parameters, name for name and shape for shape: the reference's weights load into it.
    assert {k: v.shape for k, v in pooled.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    pooled.load_state_dict(reference.state_dict())
    # Clips whose 2x2 cells repeat one token, position table included: attending over the 4 copies of a key is
    # attending over their mean, so both samplers give the same logits.
    to_tokens = "b (t h w) d -> b (t h p1 w p2) d"
    cell_sizes = {"t": 2, "h": 2, "w": 3, "p1": 2, "p2": 2}
    tokens = repeat(torch.randn(3, 12, 192), to_tokens, **cell_sizes)
    with torch.no_grad():
        reference.pos_embed_probs.copy_(repeat(torch.randn(1, 12, 192), to_tokens, **cell_sizes))
        pooled.pos_embed_probs.copy_(reference.pos_embed_probs)
    torch.testing.assert_close(pooled(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    # On distinct tokens they differ, and the tokens of one cell keep their own logits.
    distinct = torch.randn(3, n, 192)
    logits = pooled(distinct)
    assert (logits - reference(distinct)).abs().amax() > 1e-3
    in_cells = logits.view(3, 2, 2, 2, 3, 2)
    assert (in_cells - in_cells.mean(dim=(3, 5), keepdim=True)).abs().amax() > 1e-3
    # Every query reads a quarter of the keys: a quarter of the attention FLOPs.
    counted = {}
    for name, module in (("pooled", pooled), ("reference", reference)):
        with flop_counter() as counter:
            module(distinct)
        counted[name] = attention_flops(counter)
    assert counted["pooled"] * 4 == counted["reference"] > 0


def _block_flops(sampler: TokenSampler, tokens: torch.Tensor) -> int:
    from adamae_scale.bench.flops import flop_counter

    with flop_counter() as counter:
        sampler(tokens)
    return counter.get_total_flops()


def test_bad_decoder_masking_values_are_one_line_errors():
    for override, expected in (
        ("masking.decoder_ratio=0.3", "masking.decoder_mask=running_cell reconstructs 2 of every 4 positions"),
        ("masking.decoder_ratio=1.0", "masking.decoder_ratio=1.0: expected a share in [0, 1)"),
        ("masking.decoder_ratio=yes", "masking.decoder_ratio='yes': expected a number"),
        ("masking.decoder_mask=cells", "masking.decoder_mask must be one of ('running_cell', 'random')"),
        ("model.sampler_pool=3", "model.sampler_pool=3: expected a positive integer dividing the 4x4 token grid"),
        ("model.sampler_width_ratio=0.3", "model.sampler_width_ratio=0.3: expected a share in (0, 1] of the encoder"),
        ("model.sampler_kv_pool=3", "model.sampler_kv_pool=3: expected a positive integer such that sampler_pool x"),
        ("model.sampler_kv_pool=0", "model.sampler_kv_pool=0: expected an integer >= 1"),
    ):
        with pytest.raises(ValueError) as err:
            schema.validate(schema.compose([*TINY_RUN, override]))
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_panel_shows_which_masked_tokens_the_decoder_reconstructed():
    cfg = small_config(decoder_ratio=0.5)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    clip = torch.randint(0, 256, (3, 8, 48, 64), dtype=torch.uint8)
    panel = compute_panel(model, cfg, clip, mode="sampled", seed=3, index=5)
    assert panel.reconstructed is not None
    assert panel.reconstructed.sum() == cfg.num_reconstructed and not (panel.reconstructed & ~panel.mask).any()
    skipped = panel.mask & ~panel.reconstructed
    recon_row = panel.rows()[panel.row_names.index("reconstruction")]
    skipped_pixels = panel.token_map(skipped)
    assert (recon_row[skipped_pixels] == 0).all()  # black where the decoder predicted nothing
    assert (panel.error[skipped] == 0).all() and (panel.error[panel.reconstructed] > 0).all()
    # The same clip index and seed draw the same decoder targets again (keyed as in training).
    again = compute_panel(model, cfg, clip, mode="sampled", seed=3, index=5)
    assert np.array_equal(again.reconstructed, panel.reconstructed)


# Real engines: decoder masking with the cheaper sampler blocks on (sampler dropout off, so every random draw is
# keyed by the clip's stream position).
DUAL = [
    *TINY_RUN,
    "model.sampler_dropout=0.0",
    "model.sampler_width_ratio=0.5",
    "model.sampler_pool=2",
    "model.sampler_kv_pool=2",
    "masking.decoder_ratio=0.5",
    "masking.decoder_mask=random",
    "precision=fp32",
    "eval.focus_batches=0",
    "train.steps=4",
    "train.ckpt_every=1",
]


def curve(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_decoder_masking_resumes_exactly_and_consolidates(tmp_path, capsys):
    """One rank runs straight; the same run stopped after 2 steps and resumed gives the same losses bit for bit;
    its checkpoint consolidates into a weight folder that loads strictly into the configured model."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_pretrain(*DUAL, "ds=zero0", f"run_dir={straight}")
    run_pretrain(*DUAL, "ds=zero0", "train.stop_after=2", f"run_dir={resumed}")
    run_pretrain(*DUAL, "ds=zero0", f"run_dir={resumed}")
    assert len(curve(straight)) == 4
    assert curve(resumed) == curve(straight)
    assert curve(straight)[-1] < curve(straight)[0]

    code, _, err = convert_cli(capsys, "consolidate", resumed / "checkpoints", tmp_path / "weights")
    assert code == 0, err
    model = load_model(tmp_path / "weights")  # strict: every tensor present, every shape as configured
    assert (model.cfg.decoder_ratio, model.cfg.sampler_width, model.cfg.sampler_pool, model.cfg.sampler_kv_pool) == (
        0.5,
        96,
        2,
        2,
    )


@pytest.mark.slow  # two 2-rank launches' worth of time; the default twin above covers resume and consolidation
def test_decoder_masking_under_zero3_on_two_ranks_with_activation_checkpointing(tmp_path):
    """2 ranks under ZeRO-3 with every block checkpointed follow the 1-rank curve to float rounding."""
    straight, sharded = tmp_path / "straight", tmp_path / "zero3"
    run_pretrain(*DUAL, "ds=zero0", f"run_dir={straight}")
    run_ranks(2, *DUAL, "ds=zero3", "model.checkpoint_every=1", "train.micro_batch_size=2", f"run_dir={sharded}")
    # The first step sees the same masks, decoder targets and weights: equal to float rounding. After it, Adam
    # turns summation-order differences in near-zero gradients (the sampler's, scaled by λ) into small drifts.
    np.testing.assert_allclose(curve(sharded)[0], curve(straight)[0], rtol=1e-6)
    np.testing.assert_allclose(curve(sharded), curve(straight), rtol=1e-3)


def test_the_fast_preset_sets_only_options_that_passed_parity_and_composes_with_any_masking():
    cfg = schema.validate(schema.compose([*TINY_RUN, "+preset=fast"]))
    assert (cfg.decoder_ratio, cfg.decoder_mask) == (0.5, "running_cell")
    assert (cfg.sampler_width_ratio, cfg.sampler_precision, cfg.sampler_pool, cfg.sampler_kv_pool) == (
        0.5,
        "bf16",
        1,
        2,
    )
    assert cfg.mask_ratio == 0.75 and cfg.masking == "adaptive"  # the rest stays the paper's
    # Random masking with the preset keeps its decoder masking: the like-for-like baseline of adamae-bench.
    random = schema.validate(schema.compose([*TINY_RUN, "+preset=fast", "masking=random"]))
    assert (random.masking, random.decoder_ratio) == ("random", 0.5)
    from adamae_scale.bench.parity import VARIANTS

    assert VARIANTS["fast"] == ["+preset=fast"]
    for key in ("decoder_cell", "sampler_half", "sampler_bf16", "sampler_kv_pool"):  # each option measured alone
        schema.validate(schema.compose([*TINY_RUN, *VARIANTS[key]]))
    pooled = schema.validate(schema.compose([*TINY_RUN, *VARIANTS["fast_pool"]]))  # measured, failed parity: not in it
    assert (pooled.sampler_width_ratio, pooled.sampler_pool, pooled.sampler_kv_pool, pooled.decoder_ratio) == (
        0.5,
        2,
        1,
        0.5,
    )
    # The preset as it was before key/value pooling joined it (measured beside it).
    full = schema.validate(schema.compose([*TINY_RUN, *VARIANTS["fast_full_attention"]]))
    assert (full.sampler_width_ratio, full.sampler_kv_pool, full.sampler_precision) == (0.5, 1, "bf16")
    # At 16x224² (a 14x14 grid) the preset composes: 2 divides 14.
    vit_b = schema.validate(schema.compose(["model=vit_base", "+preset=fast"]))
    assert vit_b.layout.grid == (8, 14, 14) and vit_b.sampler_kv_pool == 2


def test_parity_bench_runs_the_demo_per_option_and_seed_and_places_each_against_the_default_band(capsys):
    from adamae_scale.bench import main

    small = ["train.steps=3", "eval.focus_batches=1", "train.log_every=1"]
    assert main(["parity", "variants=default,decoder_cell", "seeds=1", "parallel=2", *small]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extra_overrides"] == small
    rows = report["variants"]
    assert [len(rows[name]["runs"]) for name in ("default", "decoder_cell")] == [1, 1]
    for row in rows.values():
        assert all({"focus_ratio", "focus_ratio_topk", "loss_rec", "seconds"} <= set(run) for run in row["runs"])
        assert row["focus_ratio"]["min"] <= row["focus_ratio"]["mean"] <= row["focus_ratio"]["max"]
        assert set(row["focus_vs_default_band"].values()) <= {"below", "within", "above"}
    assert rows["default"]["passes"] is True  # the band's own mean lies within it
    assert main(["parity", "variants=default,nope"]) == 2
    assert "expected names from" in capsys.readouterr().err
