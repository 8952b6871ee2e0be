"""Training losses: cross-entropy and OHEM cross-entropy (ignore 255), plus the auxiliary total.

- `cross_entropy`: mean over labelled pixels (stage 1 of the paper).
- `ohem_cross_entropy`: Online Hard Example Mining (stage 2): keep the pixels whose softmax
  probability of the true class is below `thresh`; if fewer than `min_kept` pixels qualify, keep
  the `min_kept` hardest labelled pixels instead (lowest probability of the true class). The
  loss is the mean cross-entropy over the kept pixels; all other pixels are ignored.
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

    Pixels labelled `ignore_index` are never kept. If fewer than `min_kept` labelled pixels
    exist, all of them are kept.
    """
    with torch.no_grad():
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        prob = torch.softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        keep = valid & (prob < thresh)
        n_valid = int(valid.sum())
        if int(keep.sum()) >= min_kept or n_valid == 0:
            return keep
        if n_valid <= min_kept:
            return valid
        # Fewer hard pixels than min_kept: the min_kept labelled pixels of lowest probability.
        flat = torch.where(valid, prob, torch.full_like(prob, float("inf"))).flatten()
        idx = torch.topk(flat, min_kept, largest=False, sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[idx] = True
        return keep.view_as(valid)


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
