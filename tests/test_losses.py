"""The vectorised losses against a direct per-sample, per-token reading of the formulas."""

import torch

from adamae_scale.base.pixels import IMAGENET_MEAN, IMAGENET_STD
from adamae_scale.losses import adamae_loss, patchify, reconstruction_target

TUBELET, PATCH = 2, 4


def reference_target(video_b, t_idx, h_idx, w_idx):
    """Target of one token of one clip, written out from ADAMAE.md: un-normalise, take the cube,
    standardise per channel over its pixels (unbiased std + 1e-6), flatten channel innermost."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    pixels = video_b * std + mean  # (3, T, H, W) in [0, 1]
    cube = pixels[
        :,
        t_idx * TUBELET : (t_idx + 1) * TUBELET,
        h_idx * PATCH : (h_idx + 1) * PATCH,
        w_idx * PATCH : (w_idx + 1) * PATCH,
    ]  # (3, tubelet, p, p)
    per_channel = cube.reshape(3, -1).T  # (pixels, 3), pixels ordered (t, h, w)
    normed = (per_channel - per_channel.mean(0)) / (per_channel.std(0, unbiased=True) + 1e-6)
    return normed.reshape(-1)  # channel innermost


def reference_losses(video, pred, masked_idx, log_probs, weight):
    batch = video.shape[0]
    _, _, t, h, w = video.shape
    grid_h, grid_w = h // PATCH, w // PATCH
    total_rec, total_sampling = 0.0, 0.0
    for b in range(batch):
        errors = []
        for row, token in enumerate(masked_idx[b].tolist()):
            t_idx, rest = divmod(token, grid_h * grid_w)
            h_idx, w_idx = divmod(rest, grid_w)
            target = reference_target(video[b], t_idx, h_idx, w_idx)
            errors.append(((pred[b, row] - target) ** 2).mean())
        errors = torch.stack(errors)
        total_rec = total_rec + errors.mean()
        chosen = torch.stack([log_probs[b, j] for j in masked_idx[b].tolist()])
        total_sampling = total_sampling - (chosen * errors.detach()).mean()
    loss_rec, loss_sampling = total_rec / batch, total_sampling / batch
    return loss_rec, loss_sampling, loss_rec + weight * loss_sampling


def test_patchify_orders_tokens_t_h_w_and_pixels_t_h_w_c():
    video = torch.arange(1 * 3 * 4 * 8 * 8, dtype=torch.float32).view(1, 3, 4, 8, 8)
    tokens = patchify(video, TUBELET, PATCH)  # (1, 2*2*2, 32, 3)
    assert tokens.shape == (1, 8, 32, 3)
    # token 5 = (t=1, h=0, w=1); its pixel 0 is frame 2, row 0, column 4, every channel
    assert torch.equal(tokens[0, 5, 0], video[0, :, 2, 0, 4])
    # pixel 1 of a token is the next column
    assert torch.equal(tokens[0, 5, 1], video[0, :, 2, 0, 5])


def test_losses_match_per_sample_formulas_values_and_gradients():
    torch.manual_seed(0)
    batch, frames, size = 3, 4, 8
    video = torch.randn(batch, 3, frames, size, size)
    num_tokens = (frames // TUBELET) * (size // PATCH) ** 2
    num_masked = 5
    masked_idx = torch.stack([torch.randperm(num_tokens)[:num_masked].sort().values for _ in range(batch)])
    pixels = TUBELET * PATCH * PATCH * 3

    pred = torch.randn(batch, num_masked, pixels, requires_grad=True)
    logits = torch.randn(batch, num_tokens, requires_grad=True)
    log_probs = torch.log_softmax(logits, dim=-1)
    out = adamae_loss(video, pred, masked_idx, log_probs, TUBELET, PATCH, "norm_pix", sampling_weight=0.3)
    grads = torch.autograd.grad(out["loss"], [pred, logits])

    pred_ref = pred.detach().clone().requires_grad_(True)
    logits_ref = logits.detach().clone().requires_grad_(True)
    rec, sampling, total = reference_losses(video, pred_ref, masked_idx, torch.log_softmax(logits_ref, -1), 0.3)
    grads_ref = torch.autograd.grad(total, [pred_ref, logits_ref])

    torch.testing.assert_close(out["loss_rec"], rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_sampling"], sampling, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], total, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_reconstruction_loss_sends_no_gradient_into_the_sampler():
    torch.manual_seed(1)
    video = torch.randn(2, 3, 4, 8, 8)
    masked_idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
    pred = torch.randn(2, 3, 96, requires_grad=True)
    logits = torch.randn(2, 8, requires_grad=True)
    out = adamae_loss(video, pred, masked_idx, torch.log_softmax(logits, -1), TUBELET, PATCH)
    (grad,) = torch.autograd.grad(out["loss_rec"], [logits], allow_unused=True)
    assert grad is None


def test_pixel_target_is_the_normalised_input():
    video = torch.randn(1, 3, 2, 4, 4)
    target = reconstruction_target(video, 2, 4, "pixel")
    assert torch.equal(target, patchify(video, 2, 4).flatten(2))
