"""Model family: sizes, shapes, position tables, decoder ordering."""

import math

import pytest
import torch

from adamae_scale.models import build_model, config_for, model_names
from adamae_scale.models.layers import sincos_table_1d
from adamae_scale.models.masking import split_indices

# (embed_dim, depth, heads, mlp hidden) of the reference / ViT-g widths.
REFERENCE_WIDTHS = {
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
    "vit_base": (768, 12, 12, 3072),
    "vit_large": (1024, 24, 16, 4096),
    "vit_huge": (1280, 32, 16, 5120),
    "vit_giant": (1408, 40, 16, 6144),
}


def encoder_params(dim: int, depth: int, hidden: int, pixels_per_token: int = 1536) -> int:
    """Closed-form parameter count of the reference encoder (qkv without bias + q/v biases)."""
    block = (
        (2 * 2 * dim) + (3 * dim * dim + 2 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    )
    return pixels_per_token * dim + dim + depth * block + 2 * dim


@pytest.mark.parametrize("name", sorted(REFERENCE_WIDTHS))
def test_every_size_builds_with_reference_widths(name):
    cfg = config_for(name)
    with torch.device("meta"):
        model = build_model(cfg)
    dim, depth, heads, hidden = REFERENCE_WIDTHS[name]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (dim, depth, heads)
    assert len(model.encoder.blocks) == depth
    assert model.encoder.blocks[0].mlp.fc1.out_features == hidden
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert encoder == encoder_params(dim, depth, hidden)
    print(
        f"{name}: total {model.num_params():,} params, encoder {encoder:,}, "
        f"sampler {sum(p.numel() for p in model.sampler.parameters()):,}"
    )


def test_model_names_are_the_six_sizes():
    assert model_names() == sorted(REFERENCE_WIDTHS)


def test_base_sampler_has_about_8_3m_parameters():
    with torch.device("meta"):
        model = build_model(config_for("vit_base"))
    assert abs(sum(p.numel() for p in model.sampler.parameters()) - 8.3e6) < 0.05e6


def test_sincos_table_matches_the_formula():
    table = sincos_table_1d(10, 8)[0]
    for pos in (0, 3, 9):
        for ch in range(8):
            angle = pos / 10000 ** (2 * (ch // 2) / 8)
            want = math.sin(angle) if ch % 2 == 0 else math.cos(angle)
            assert abs(table[pos, ch].item() - want) < 1e-6


def test_forward_shapes_non_square_and_given_mask():
    torch.manual_seed(0)
    cfg = config_for(
        "vit_tiny", num_frames=4, img_size=[32, 48], patch_size=8, depth=2, decoder_depth=1, mask_ratio=0.75
    )
    assert cfg.layout.grid == (2, 4, 6) and cfg.num_visible == 12
    model = build_model(cfg).eval()
    video = torch.randn(2, 3, 4, 32, 48)
    out = model(video)
    assert out.pred.shape == (2, 36, 3 * 2 * 8 * 8)
    assert out.mask.shape == (2, 48) and int((~out.mask).sum()) == 24

    # A given mask is used as is, and predictions come back in ascending masked-token order.
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[:, :12] = False
    again = model(video, mask=mask)
    assert torch.equal(again.mask, mask)
    assert torch.equal(again.masked_idx, split_indices(mask)[1])
    assert torch.equal(again.masked_idx[0], torch.arange(12, 48))


def test_prediction_of_a_masked_token_does_not_depend_on_its_own_pixels():
    torch.manual_seed(0)
    cfg = config_for(
        "vit_tiny",
        num_frames=2,
        img_size=[16, 16],
        patch_size=8,
        depth=1,
        decoder_depth=1,
        mask_ratio=0.5,
        masking="random",
    )
    model = build_model(cfg).eval()
    mask = torch.tensor([[False, True, False, True]])
    video = torch.randn(1, 3, 2, 16, 16)
    changed = video.clone()
    changed[:, :, :, 0:8, 8:16] += 5.0  # token 1 (masked)
    a, b = model(video, mask=mask), model(changed, mask=mask)
    torch.testing.assert_close(a.pred, b.pred)


def test_a_training_block_drops_out_where_the_reference_does():
    """The reference block (the sampler's, dropout 0.1) drops out after the attention projection and after
    ``fc2``, not after the MLP's activation: written here with plain ops, it draws the same dropout masks."""
    import torch.nn.functional as F

    from adamae_scale.models.layers import Block

    torch.manual_seed(0)
    block = Block(16, 2, qkv_bias=False, drop=0.5, norm_eps=1e-5).train()
    x = torch.randn(2, 6, 16)

    def reference(x):
        h = block.norm1(x)
        q, k, v = F.linear(h, block.attn.qkv.weight).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1) @ v
        x = x + F.dropout(block.attn.proj(attn.transpose(1, 2).reshape(2, 6, 16)), 0.5)
        h = F.gelu(block.mlp.fc1(block.norm2(x)))
        return x + F.dropout(block.mlp.fc2(h), 0.5)

    torch.manual_seed(1)
    ours = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours, reference(x), rtol=1e-5, atol=1e-5)


def test_the_mask_token_is_drawn_within_one_standard_deviation_like_the_reference():
    torch.manual_seed(0)
    model = build_model(config_for("vit_tiny", decoder_embed_dim=512))
    token = model.mask_token.detach()
    assert token.abs().max() <= 0.02 and token.std() > 0.008  # within ±std, and not degenerate


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        config_for("vit_tiny", img_size=[30, 32], patch_size=8)
    with pytest.raises(ValueError, match="unknown model"):
        config_for("vit_enormous")


def test_compiled_blocks_with_activation_checkpointing_match_eager_mode():
    """``train.compile``: the compiled blocks (checkpointed, with dropout, under bf16 autocast as in training) give
    eager mode's outputs and gradients, and keep their parameter names."""
    import copy

    from adamae_scale.engine.setup import apply_activation_checkpointing, compile_blocks
    from adamae_scale.models.layers import Block

    torch.manual_seed(0)
    eager = torch.nn.Sequential(Block(32, 2, drop=0.1))
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_blocks(compiled) == 1
    assert apply_activation_checkpointing(compiled, every=1) == 1
    assert [n for n, _ in compiled.named_parameters()] == names
    x = torch.randn(2, 8, 32)

    def run(model):
        torch.manual_seed(1)  # the same dropout masks for both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return out.float(), [p.grad for p in model.parameters()]

    from torch._dynamo.utils import counters

    out_eager, grads_eager = run(eager)
    graphs = counters["stats"]["unique_graphs"]
    out_compiled, grads_compiled = run(compiled)
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not silently left eager
    torch.testing.assert_close(out_compiled, out_eager, atol=2e-2, rtol=2e-2)
    for g_compiled, g_eager in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(g_compiled, g_eager, atol=2e-3, rtol=5e-2)
