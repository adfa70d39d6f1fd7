"""What one training step computes for AdaMAE, and the focus evaluation.

``AdaMAEObjective`` is the ``loss_fn(model, batch)`` the trainer calls: forward, losses and — when
the batch carries motion ground truth (synthetic data) — ``focus_ratio`` of the sampled masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .losses import adamae_loss
from .metrics import focus_ratio
from .models.adamae import AdaMAEConfig, keyed_mask_noise
from .models.masking import mask_from_visible, sample_mask


@dataclass
class AdaMAEObjective:
    model_cfg: AdaMAEConfig
    target: str = "norm_pix"
    sampling_weight: float = 1e-4
    seed: int = 0

    def __call__(self, model: Callable[..., Any], batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        # Masks keyed by stream position when the batch has them: world-size invariant runs, exact resume.
        noise = (
            keyed_mask_noise(self.model_cfg, batch["sample_position"], self.seed) if "sample_position" in batch else {}
        )
        out = model(batch["video"], **noise)
        losses = adamae_loss(
            batch["video"],
            out.pred,
            out.masked_idx,
            out.log_probs,
            self.model_cfg.tubelet_size,
            self.model_cfg.patch_size,
            self.target,
            self.sampling_weight,
        )
        result: dict[str, Any] = {k: losses[k] for k in ("loss", "loss_rec", "loss_sampling")}
        if "motion" in batch:
            result["focus_ratio"] = focus_ratio(out.mask, batch["motion"])
        return result


@torch.no_grad()
def evaluate_focus(
    model: Callable[..., Any],
    model_cfg: AdaMAEConfig,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
) -> dict[str, float]:
    """Focus of the trained sampler on held-out clips, three ways, over the same clips:

    - ``focus_ratio``: masks sampled as in training (Gumbel-top-k from p);
    - ``focus_ratio_topk``: the deterministic top-k of p (what a visualisation shows);
    - ``focus_ratio_random``: random masking at the same ratio (the baseline, ~1.0).
    """
    masks: dict[str, list[torch.Tensor]] = {"sampled": [], "topk": [], "random": []}
    motion = []
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        video = batch["video"].to(device)
        out = model(video)
        masks["sampled"].append(out.mask.cpu())
        if out.logits is not None:
            topk = torch.topk(out.logits.float(), model_cfg.num_visible, dim=-1).indices
            masks["topk"].append(mask_from_visible(topk, model_cfg.num_tokens).cpu())
        noise = torch.rand(video.shape[0], model_cfg.num_tokens, generator=generator)
        masks["random"].append(
            sample_mask(
                "random", model_cfg.layout, model_cfg.num_visible, video.shape[0], torch.device("cpu"), noise=noise
            )
        )
        motion.append(batch["motion"].cpu())
    motion_all = torch.cat(motion)
    report = {
        "focus_ratio": focus_ratio(torch.cat(masks["sampled"]), motion_all),
        "focus_ratio_random": focus_ratio(torch.cat(masks["random"]), motion_all),
        "motion_token_fraction": float(motion_all.float().mean()),
    }
    if masks["topk"]:
        report["focus_ratio_topk"] = focus_ratio(torch.cat(masks["topk"]), motion_all)
    return report
