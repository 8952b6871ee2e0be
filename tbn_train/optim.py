"""The optimizer and the learning-rate schedule of each stage (SGD, poly decay after warmup)."""

import torch

from .config import TrainConfig


def build_optimizer(model, cfg: TrainConfig, stage: int) -> torch.optim.SGD:
    if stage == 1:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    else:
        context = {id(p) for p in model.context_parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) in context],
             "lr": cfg.stage2_lr_context},
            {"params": [p for p in model.parameters() if id(p) not in context],
             "lr": cfg.stage2_lr_rest},
        ]
    return torch.optim.SGD(groups, lr=groups[-1]["lr"], momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Poly decay (1 - step/total)^power, after an optional linear warmup."""
    factor = (1.0 - min(step, total) / total) ** cfg.poly_power
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor
