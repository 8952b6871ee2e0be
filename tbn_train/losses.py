"""Training losses: cross-entropy and OHEM cross-entropy (ignore 255), plus the auxiliary total.

- `cross_entropy`: mean over labelled pixels (stage 1 of the paper).
- `ohem_cross_entropy`: Online Hard Example Mining (stage 2): in each image, keep the pixels
  whose softmax probability of the true class is below `thresh`; if fewer than `min_kept`
  pixels of that image qualify, keep its `min_kept` hardest labelled pixels instead (lowest
  probability of the true class). The loss is the mean cross-entropy over the kept pixels of
  the batch; all other pixels are ignored. `min_kept` counts per image, so what an image keeps
  does not depend on how many clips share its micro-batch (one per GPU, or several with
  accumulation). mmsegmentation's OHEMPixelSampler also scales min_kept by the batch size, but
  with one threshold over the whole batch.
- `total_loss`: main loss + aux_weight * sum of the auxiliary heads' losses (BiSeNet).
"""

from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

from tbn_runtime.classes import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not `ignore_index` (0 if there are none)."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0  # keeps the graph (DDP) and gives zero gradients
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def ohem_keep_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                   min_kept: int = 100000, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean B x H x W mask of the pixels OHEM trains on (see the module docstring).

    Per image: pixels labelled `ignore_index` are never kept; an image with fewer than
    `min_kept` labelled pixels keeps all of them.
    """
    with torch.no_grad():
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        prob = torch.softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        keep = (valid & (prob < thresh)).flatten(1)
        short = keep.sum(1) < min_kept  # images with too few hard pixels
        if min_kept <= 0 or not short.any():
            return keep.view_as(valid)
        # Those images keep their min_kept labelled pixels of lowest probability instead.
        flat = torch.where(valid, prob, torch.full_like(prob, float("inf"))).flatten(1)
        k = min(min_kept, flat.shape[1])
        idx = torch.topk(flat, k, dim=1, largest=False, sorted=False).indices
        hardest = torch.zeros_like(keep).scatter_(1, idx, True) & valid.flatten(1)
        return torch.where(short.unsqueeze(1), hardest, keep).view_as(valid)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 100000, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels `ohem_keep_mask` keeps (0 if none)."""
    keep = ohem_keep_mask(logits, target, thresh, min_kept, ignore_index)
    if not keep.any():
        return logits.sum() * 0.0
    masked = torch.where(keep, target, torch.full_like(target, ignore_index))
    return F.cross_entropy(logits.float(), masked, ignore_index=ignore_index)


def make_criterion(name: str, ohem_thresh: float = 0.7, ohem_min_kept: int = 100000
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-head loss by name: "ce" or "ohem"."""
    if name == "ce":
        return cross_entropy
    if name == "ohem":
        return lambda logits, target: ohem_cross_entropy(logits, target, ohem_thresh,
                                                         ohem_min_kept)
    raise ValueError(f"unknown loss '{name}'; known losses: ce, ohem")


def total_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], target: torch.Tensor,
               aux_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """{"loss": main + aux_weight * sum(aux), "main": main, "aux": sum(aux)}."""
    main = criterion(logits, target)
    aux = sum((criterion(a, target) for a in aux_logits), main.new_zeros(()))
    return {"loss": main + aux_weight * aux, "main": main.detach(), "aux": aux.detach()}
