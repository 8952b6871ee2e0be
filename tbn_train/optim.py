"""The optimizer and the learning-rate schedule of both training stages.

Learning-rate groups (SGD with momentum; poly decay, optional linear warmup):
  stage 1  the backbone at lr * backbone_lr_mult, everything else at lr. The VSPW baseline
           (train_clip.py, adjust_learning_rate) gives its encoder 0.1 x the lr; the TBN-ViT
           paper gives 0.002 "for whole network" (backbone_lr_mult 1).
  stage 2  model.context_parameters() at stage2_lr_context, the other layers at stage2_lr_rest
           (the paper: 0.0002 for "the context path", 0.0005 for the other layers; which
           parameters make the context path is the model's docstring's reading).
Each group is split by `no_decay`, the parameters trained without weight decay:
  "norm_bias_pos"  every 1-D parameter (norm weights and biases, all biases) and what the
                   backbone's `no_weight_decay()` names (Swin's relative position tables): the
                   rule of timm's param_groups_weight_decay, and mmsegmentation's Swin recipes
                   (norms and position tables at decay_mult 0).
  "bias"           parameters named *.bias: the VSPW baseline (get_trainable_params).
  "none"           weight decay on everything.
"""

from typing import Dict, List

import torch
import torch.nn as nn

NO_DECAY = ("norm_bias_pos", "bias", "none")


def no_decay_names(model: nn.Module, rule: str) -> set:
    """Names of the parameters `rule` exempts from weight decay."""
    if rule not in NO_DECAY:
        raise ValueError(f"no_decay must be one of {', '.join(NO_DECAY)}, got '{rule}'")
    if rule == "none":
        return set()
    names = {n for n, p in model.named_parameters() if n.endswith(".bias")}
    if rule == "norm_bias_pos":
        names |= {n for n, p in model.named_parameters() if p.ndim <= 1}
        for prefix, module in model.named_modules():
            if hasattr(module, "no_weight_decay") and prefix:
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
    return names


def param_groups(model: nn.Module, cfg, stage: int) -> List[Dict]:
    """SGD parameter groups: (lr group) x (decay, no decay), empty groups left out.

    Each group carries a "name" ("backbone", "head/no_decay", ...) for logs and tests. The last
    group is always at the head's (stage 2: the other layers') lr, the one train.py logs.
    """
    if stage == 1:
        split = {id(p) for p in model.backbone_parameters()}
        lrs = (("backbone", cfg.lr * cfg.backbone_lr_mult), ("head", cfg.lr))
    else:
        split = {id(p) for p in model.context_parameters()}
        lrs = (("context", cfg.stage2_lr_context), ("rest", cfg.stage2_lr_rest))
    exempt = no_decay_names(model, cfg.no_decay)
    groups = []
    for in_split, (name, lr) in zip((True, False), lrs):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters() if p.requires_grad
                      and (id(p) in split) == in_split and (n not in exempt) == decay]
            if params:
                groups.append({"params": params, "lr": lr, "name": name if decay else
                               f"{name}/no_decay",
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return groups


def build_optimizer(model, cfg, stage: int) -> torch.optim.SGD:
    """SGD with momentum over `param_groups(model, cfg, stage)`."""
    groups = param_groups(getattr(model, "module", model), cfg, stage)
    return torch.optim.SGD(groups, lr=groups[-1]["lr"], momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg) -> float:
    """Poly decay (1 - step/total)^power, after an optional linear warmup."""
    factor = (1.0 - min(step, total) / total) ** cfg.poly_power
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor
