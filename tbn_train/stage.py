"""A training stage's parts: the model, the data, the loss, the optimizer and schedule, DDP,
and the state that resumes it.

Split as torchvision's references/segmentation/train.py splits its script: small top-level
functions (`create_model`, `build_loader`, `build_stage`; `snapshot`/`restore` of the saved
state), the loop that runs them in tbn_train.engine, the command line in tbn_train.train.

Several processes (torchrun): each trains batch_size clips per micro-step; the global batch is
batch_size * accum * processes, and a run with the same global batch gives the same result
however it is split (tbn_train.sampling). SyncBatchNorm replaces BatchNorm on CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import losses
from .checkpoint import load_model
from .config import TrainConfig, resume_changes
from .data.vspw import VSPWClips, check_class_count, check_train_ids, index_split
from .distributed import DistInfo
from .errors import CheckpointError
from .models import build_model
from .optim import build_optimizer, lr_factor
from .preemption import ignore_stop_signals
from .sampling import GlobalBatchSampler, SeededItems

log = logging.getLogger(__name__)

CLASSES_FIX = "pass --num-classes with the data's class count (VSPW: 124)"


@dataclass
class Stage:
    """What one stage holds while it trains; `step` counts the completed optimizer steps."""

    number: int
    dir: Path
    model: nn.Module            # what is saved and evaluated
    net: nn.Module              # what a step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    criterion: Callable
    loader: Any
    sampler: GlobalBatchSampler
    accum: int
    global_batch: int
    total: int
    use_amp: bool
    amp_dtype: torch.dtype
    step: int = 0
    best: float = -1.0
    done: bool = False
    saved_step: int = -1        # the step last.* holds (rank 0)
    saved_at: float = field(default_factory=time.monotonic)
    buffers: Optional[List[torch.Tensor]] = None  # BatchNorm statistics before this step

    @property
    def last(self) -> Path:
        return self.dir / "last.safetensors"

    def where(self) -> str:
        return f"stage {self.number} step {self.step}/{self.total}"


# -- model, data, optimisation --------------------------------------------------------------------
def create_model(cfg: TrainConfig, stage: int, out: Path, resume: bool) -> nn.Module:
    """Stage 1: a new model (or its last checkpoint); stage 2: stage 1's weights (or its last)."""
    last = out / f"stage{stage}" / "last.safetensors"
    if resume and last.is_file():
        return load_model(str(last))[0]
    if stage == 2:
        src = out / "stage1" / "best.safetensors"
        src = src if src.is_file() else out / "stage1" / "last.safetensors"
        if not src.is_file():
            raise CheckpointError(f"stage 2 starts from stage 1's weights, but {src} does not "
                                  f"exist; run --stage 1 (or --stage all) first")
        return load_model(str(src))[0]
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                       **cfg.model_kwargs)


class CheckedLabels(Dataset):
    """Training clips whose labels are checked against the model's classes, naming the mask
    (cross-entropy would fail with an index error on the CPU, a device assert on CUDA)."""

    def __init__(self, clips: VSPWClips, num_classes: int) -> None:
        self.clips, self.num_classes = clips, num_classes

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        clip, label = self.clips[index]
        v, t = self.clips.items[index]
        check_train_ids(label.numpy(), self.num_classes, self.clips.videos[v].masks[t],
                        CLASSES_FIX)
        return clip, label


def build_loader(cfg: TrainConfig, model, info: DistInfo, accum: int):
    dataset = VSPWClips(cfg.data, cfg.train_split, offsets=model.temporal_offsets,
                        crop_size=tuple(cfg.crop_size), scale_range=tuple(cfg.scale_range),
                        flip=cfg.flip, train=True, reference=model.reference_frames,
                        reverse_prob=cfg.temporal_reverse)
    # Before the first step: the val split exists, and a sample of both splits' masks fits
    # the model's classes (CheckedLabels and the evaluation check every item).
    check_class_count(dataset.videos, model.num_classes, CLASSES_FIX)
    check_class_count(index_split(cfg.data, cfg.val_split), model.num_classes, CLASSES_FIX)
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, accum, info.world_size,
                                 info.rank, cfg.seed)
    loader = torch.utils.data.DataLoader(SeededItems(CheckedLabels(dataset, model.num_classes)),
                                         batch_sampler=sampler, num_workers=cfg.workers,
                                         worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(cfg.seed),
                                         pin_memory=info.device.type == "cuda")
    return loader, sampler


def micro_batches(loader, sampler: GlobalBatchSampler, start_step: int):
    """Micro-batches from global step `start_step` on, epoch after epoch.

    Closing the generator (or an error out of it) shuts the DataLoader's workers down at once:
    they ignore the stop signals, so if a reference to the iterator outlived the stage (an
    error's traceback holds one), Python's exit would wait for them forever."""
    epoch, offset = divmod(start_step, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, offset)
        batches = iter(loader)
        try:
            yield from batches
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)  # worker processes only
            if shutdown is not None:
                shutdown()
        epoch, offset = epoch + 1, 0


def micro_seed(seed: int, stage: int, step: int, micro: int) -> int:
    return (((seed * 7 + stage) * 1000003 + step) * 1009 + micro) % (2**63 - 1)


def resolve_accum(cfg: TrainConfig, world: int) -> int:
    if cfg.global_batch <= 0:
        return cfg.accum
    per_step = cfg.batch_size * world
    if cfg.global_batch % per_step:
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of batch_size "
                         f"{cfg.batch_size} x {world} processes; change --global-batch or "
                         f"--batch-size (or --global-batch 0 to use --accum)")
    return cfg.global_batch // per_step


def check_batchnorm_batch(cfg: TrainConfig, model, info: DistInfo) -> None:
    """BiSeNet's attention and global-context BatchNorms see one value per channel and frame:
    with a single frame per forward pass, BatchNorm cannot train. Say so before step 1."""
    n_past = len(model.temporal_offsets)
    frames = cfg.batch_size * (n_past + 1 if n_past and cfg.past_grad else 1)
    if info.distributed and info.device.type == "cuda":
        frames *= info.world_size  # SyncBatchNorm pools the statistics of every process
    if frames < 2:
        raise ValueError(f"{cfg.model} with batch size {cfg.batch_size} puts one frame through "
                         f"each BatchNorm (its global-pooling BatchNorms need 2 or more): use "
                         f"--batch-size 2 (with --global-batch a multiple of it), "
                         f"{'--past-grad, ' if n_past else ''}or several GPUs with SyncBatchNorm")


def build_stage(cfg: TrainConfig, number: int, out: Path, info: DistInfo,
                state: Optional[Dict] = None) -> Stage:
    """A stage's model (new, from stage 1 for stage 2, or last.* with a state to resume),
    data, loss, optimizer, schedule and DDP wrapper, with the state restored."""
    model = create_model(cfg, number, out, state is not None).to(info.device)
    model.train()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    accum = resolve_accum(cfg, info.world_size)
    check_batchnorm_batch(cfg, model, info)
    loader, sampler = build_loader(cfg, model, info, accum)
    iters = cfg.iters if number == 1 else cfg.stage2_iters
    total = iters if iters > 0 else cfg.epochs * sampler.steps_per_epoch
    criterion = losses.make_criterion(cfg.loss if number == 1 else cfg.stage2_loss,
                                      cfg.ohem_thresh, cfg.ohem_min_kept)
    optimizer = build_optimizer(model, cfg, number)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    use_amp = cfg.amp != "none" and info.device.type == "cuda"
    if cfg.amp != "none" and not use_amp and info.is_main:
        log.warning(f"amp {cfg.amp} needs CUDA; training in fp32 on {info.device}")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
    st = Stage(number, out / f"stage{number}", model, model, optimizer, scheduler, scaler,
               criterion, loader, sampler, accum, cfg.batch_size * accum * info.world_size,
               total, use_amp, torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
    if state is not None:
        restore(st, state, info)
    if info.distributed:
        if info.device.type == "cuda":
            st.model = nn.SyncBatchNorm.convert_sync_batchnorm(st.model)
        unused = cfg.aux_weight == 0 and getattr(st.model, "aux16", None) is not None
        st.net = nn.parallel.DistributedDataParallel(
            st.model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=unused)
    return st


# -- the saved state ------------------------------------------------------------------------------
def snapshot(st: Stage, info: DistInfo, done: bool) -> Dict:
    return {"stage": st.number, "step": st.step, "total": st.total, "done": done,
            "best_miou": st.best, "global_batch": st.global_batch,
            "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
            "scaler": st.scaler.state_dict() if st.scaler.is_enabled() else {},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": (torch.cuda.get_rng_state(info.device)
                         if info.device.type == "cuda" else None)}


def restore(st: Stage, state: Dict, info: DistInfo) -> None:
    if state["global_batch"] != st.global_batch:
        raise ValueError(f"{st.dir} was trained with global batch {state['global_batch']}, "
                         f"this command gives {st.global_batch}; resume with the same global "
                         f"batch (--global-batch, or --batch-size x --accum x processes)")
    st.optimizer.load_state_dict(state["optimizer"])
    st.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        st.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if info.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], info.device)
    st.step, st.best, st.done = state["step"], state["best_miou"], bool(state["done"])
    st.saved_step = st.step


def finished(state: Dict, cfg: TrainConfig, number: int) -> bool:
    """Is a resumed stage done, with the length the command asks for (a longer --iters
    continues it)?"""
    length = ("iters", "epochs") if number == 1 else ("stage2_iters",)
    return state["done"] and all(state["config"].get(k) == getattr(cfg, k) for k in length)


def check_resume_settings(state: Dict, cfg: TrainConfig, number: int,
                          stage_dir: Path) -> None:
    """Refuse to resume with settings that change the results (listing them); log the
    differences that do not."""
    safe, unsafe = resume_changes(state["config"], cfg, number)
    if unsafe:
        raise ValueError(f"--resume with settings that change how {stage_dir} trains: "
                         f"{', '.join(unsafe)}; resume with the run's settings (drop these "
                         f"flags), or start a new run with --out DIR (or --overwrite)")
    if safe:
        log.info(f"resuming {stage_dir} with changed settings: {', '.join(safe)}")
