"""One training stage in small steps: build it, train a step, log, evaluate and save, stop.

Split as torchvision's references/segmentation/train.py splits its loop: the stage's parts
(`build_stage`: model, data, optimizer, schedule, loss, DDP, a resumed state), one optimizer
step (`train_step`), its log line (`log_step`), `evaluate_and_save`, the saved state
(`save_last`, `snapshot`, `restore`), the stop point every process reaches (`halt_if_asked`),
and `train_stage`, the loop that strings them together. tbn_train.train is the command line.

What is saved, and when: last.safetensors + last.state.pt at every evaluation, every
`save_minutes`, at the end of the stage, and before any early stop (a signal, a data error in
training or evaluation); best.safetensors at each new best val mIoU. A stop is decided between
two steps, by all processes together; a step cut short by an exception (a second Ctrl-C) has its
BatchNorm statistics undone before the save. A non-finite loss saves nothing: the last save is
the last good state.

Several processes (torchrun): each trains batch_size clips per micro-step; the global batch is
batch_size * accum * processes, and a run with the same global batch gives the same result
however it is split (tbn_train.sampling). SyncBatchNorm replaces BatchNorm on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from tbn_runtime.files import atomic_write

from . import distributed as dist_utils
from . import losses
from .checkpoint import load_model, save_checkpoint, save_train_state
from .cli import progress_bar
from .config import TrainConfig, resume_changes
from .data.vspw import VSPWClips, check_class_count, check_train_ids, index_split
from .distributed import DistInfo
from .errors import CheckpointError, DatasetError, NonFiniteLoss, TrainingStopped
from .evaluate import evaluate_model
from .models import build_model
from .optim import build_optimizer, lr_factor
from .preemption import StopRequest, ignore_stop_signals
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
    dataset = VSPWClips(cfg.data, cfg.train_split, offsets=model.temporal_offsets or (0,),
                        crop_size=tuple(cfg.crop_size), scale_range=tuple(cfg.scale_range),
                        flip=cfg.flip, train=True)
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


def save_last(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest,
              done: bool = False) -> None:
    """Write last.safetensors and last.state.pt (rank 0), never cut in half by a signal."""
    with stop.critical():
        save_checkpoint(str(st.last), st.model, cfg.to_dict(),
                        {"stage": st.number, "step": st.step})
        save_train_state(str(st.dir / "last.state.pt"), snapshot(st, info, done))
    st.saved_step, st.saved_at, st.done = st.step, time.monotonic(), done


def finished(state: Dict, cfg: TrainConfig, number: int) -> bool:
    """Is a resumed stage done, with the length the command asks for (a longer --iters
    continues it)?"""
    length = ("iters", "epochs") if number == 1 else ("stage2_iters",)
    return state["done"] and all(state["config"].get(k) == getattr(cfg, k) for k in length)


def check_resume_settings(state: Dict, cfg: TrainConfig, number: int, stage_dir: Path) -> None:
    safe, unsafe = resume_changes(state["config"], cfg, number)
    if unsafe:
        raise ValueError(f"--resume with settings that change how {stage_dir} trains: "
                         f"{', '.join(unsafe)}; resume with the run's settings (drop these "
                         f"flags), or start a new run with --out DIR (or --overwrite)")
    if safe:
        log.info(f"resuming {stage_dir} with changed settings: {', '.join(safe)}")


def trim_log(path: Path, step: int) -> None:
    """Drop the metrics.jsonl records of steps after `step` (a run killed after its last
    save logged them; the resumed run logs them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write(str(path), lambda tmp: Path(tmp).write_text("".join(keep)))


def append_jsonl(path: Path, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- one step, its log line, evaluation -----------------------------------------------------------
def fetch(batches: Iterator, accum: int) -> Tuple[List, Optional[DatasetError]]:
    """This process's micro-batches of the next step, or the data error met reading them."""
    micro: List = []
    try:
        for _ in range(accum):
            micro.append(next(batches))
    except DatasetError as e:
        return micro, e
    return micro, None


def train_step(st: Stage, micro: List, cfg: TrainConfig, info: DistInfo,
               stop: StopRequest) -> float:
    """One optimizer step: forward and backward of this process's micro-batches (gradients
    averaged over processes by DDP), then the update. Returns the loss, averaged over ranks."""
    st.buffers = [b.detach().clone() for b in st.model.buffers()]
    loss_sum = torch.zeros((), device=info.device)
    for a, (clip, label) in enumerate(micro):
        # Stochastic depth etc. draw from a seed of (step, global micro-batch): the same
        # however the global batch is split over processes and accumulation, and nothing to
        # restore on resume.
        torch.manual_seed(micro_seed(cfg.seed, st.number, st.step, a * info.world_size +
                                     info.rank))
        clip = clip.to(info.device, non_blocking=True)
        label = label.to(info.device, non_blocking=True)
        sync = st.net.no_sync() if (info.distributed and a < st.accum - 1) else \
            contextlib.nullcontext()
        with sync:
            with torch.autocast(info.device.type, dtype=st.amp_dtype, enabled=st.use_amp):
                logits, aux = st.net(clip, aux=True, past_grad=cfg.past_grad)
            loss = losses.total_loss(st.criterion, logits, aux, label,
                                     cfg.aux_weight)["loss"] / st.accum
            st.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    loss = dist_utils.mean_over_ranks(loss_sum, info).item()
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at stage {st.number} step {st.step + 1}; stopped "
                            f"without saving, the last good checkpoint is {st.last} (lower "
                            f"--lr, then --resume)")
    with stop.critical():
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.optimizer.zero_grad(set_to_none=True)
        st.scheduler.step()
        st.step += 1
        st.buffers = None
    return loss


@dataclass
class LossLog:
    """The losses since the last log line."""

    total: float = 0.0
    n: int = 0
    since: float = field(default_factory=time.perf_counter)


def log_step(st: Stage, cfg: TrainConfig, info: DistInfo, loss: float, meter: LossLog, bar,
             writer) -> None:
    meter.total, meter.n = meter.total + loss, meter.n + 1
    if not info.is_main or not (st.step % cfg.log_interval == 0 or st.step == st.total):
        return
    rate = meter.n / (time.perf_counter() - meter.since)
    lr = st.optimizer.param_groups[-1]["lr"]
    record = {"stage": st.number, "step": st.step, "loss": meter.total / meter.n, "lr": lr,
              "it_s": rate}
    append_jsonl(st.dir / "metrics.jsonl", record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", it_s=f"{rate:.2f}")
    # the bar shows it; without a bar (a log file, -q) the line is the progress
    log.log(logging.DEBUG if not bar.disable else logging.INFO,
            f"{st.where()}: loss {record['loss']:.4f}, lr {lr:.2e}, {rate:.2f} it/s")
    if writer:
        writer.add_scalar(f"stage{st.number}/loss", record["loss"], st.step)
        writer.add_scalar(f"stage{st.number}/lr", lr, st.step)
    meter.total, meter.n, meter.since = 0.0, 0, time.perf_counter()


def record_eval(st: Stage, cfg: TrainConfig, summary: Dict, writer) -> None:
    miou = summary["mIoU"] if summary["mIoU"] is not None else -1.0
    append_jsonl(st.dir / "metrics.jsonl", {
        "stage": st.number, "step": st.step, "eval": cfg.val_split,
        **{k: summary[k] for k in ("mIoU", "pixel_acc", "mVC8", "mVC16", "frames")}})
    if writer:
        writer.add_scalar(f"stage{st.number}/val_mIoU", miou, st.step)
    log.info(f"{st.where()}: val mIoU {miou:.2f} mVC8 {summary['mVC8'] or 0:.2f} "
             f"(best {max(st.best, miou):.2f})")
    if miou > st.best:
        st.best = miou
        save_checkpoint(str(st.dir / "best.safetensors"), st.model, cfg.to_dict(),
                        {"stage": st.number, "step": st.step, "val_mIoU": miou})


def evaluate_and_save(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest,
                      writer, progress: bool) -> Optional[DatasetError]:
    """Rank 0 evaluates on the val split (stopping early on a signal), keeps best.* and saves
    last.* whatever happened; every rank waits for it. Returns the data error evaluation met
    (reported at the next halt_if_asked, after the save)."""
    error = None
    if info.is_main:
        try:
            summary = evaluate_model(st.model, cfg.data, cfg.val_split, info.device,
                                     progress=progress, should_stop=lambda: stop.requested)
        except DatasetError as e:
            summary, error = None, e
        st.model.train()
        if summary is not None:
            record_eval(st, cfg, summary, writer)
        elif error is None:
            log.info(f"{st.where()}: evaluation stopped by {stop.name}")
        save_last(st, cfg, info, stop, done=st.step >= st.total and summary is not None)
    else:  # if rank 0's evaluation did not end, the next halt_if_asked stops every rank
        st.done = st.step >= st.total
    dist_utils.barrier(info)
    return error


def halt_if_asked(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest,
                  error: Optional[DatasetError]) -> None:
    """Every process calls this between two steps. If any was signalled or met a data error,
    all stop here, at the same step: rank 0 saves it (unless last.* holds it already) and
    every process raises TrainingStopped."""
    stop_any, error_any = dist_utils.any_rank([stop.requested, error is not None], info)
    if not (stop_any or error_any):
        return
    if info.is_main and st.saved_step != st.step:
        save_last(st, cfg, info, stop)
    dist_utils.barrier(info)
    saved = f"{st.where()} is saved in {st.last}"
    if error is not None:
        if error.worker_traceback:
            log.debug(error.worker_traceback)
        raise TrainingStopped(f"{error}; training stopped, {saved}: fix the file, then run "
                              f"again with --resume", 2, logging.ERROR)
    if error_any:
        raise TrainingStopped(f"a data error in another process stopped training; {saved}",
                              2, logging.ERROR)
    cause = stop.name if stop.requested else "a signal to another process"
    raise TrainingStopped(f"{cause}: stopped, {saved}; continue with --resume", stop.exit_code)


# -- the stage ------------------------------------------------------------------------------------
def make_writer(stage_dir: Path, purge_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(stage_dir / "tb"), purge_step=purge_step)


def run_steps(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest, writer,
              progress: bool) -> None:
    """Train from st.step to st.total, evaluating, saving and stopping as the module says."""
    meter, pending = LossLog(), None  # pending: a data error to report at the next halt
    shown = progress and info.is_main
    with progress_bar(st.total, f"stage {st.number}", shown, initial=st.step) as bar:
        batches = micro_batches(st.loader, st.sampler, st.step)
        try:
            while st.step < st.total:
                micro: List = []
                if pending is None:
                    micro, pending = fetch(batches, st.accum)
                halt_if_asked(st, cfg, info, stop, pending)
                loss = train_step(st, micro, cfg, info, stop)
                bar.update(1)
                log_step(st, cfg, info, loss, meter, bar, writer)
                if st.step % cfg.eval_interval == 0 or st.step == st.total:
                    pending = evaluate_and_save(st, cfg, info, stop, writer, shown)
                elif (info.is_main and cfg.save_minutes > 0 and
                      time.monotonic() - st.saved_at >= 60 * cfg.save_minutes):
                    save_last(st, cfg, info, stop)
            halt_if_asked(st, cfg, info, stop, pending)
            if not st.done:  # resumed after the last step but before its evaluation ended
                halt_if_asked(st, cfg, info, stop,
                              evaluate_and_save(st, cfg, info, stop, writer, shown))
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside a StopRequest
            if st.buffers is not None:  # cut inside a step: undo its BatchNorm statistics
                for b, saved in zip(st.model.buffers(), st.buffers):
                    b.copy_(saved)
            if info.is_main and st.saved_step != st.step:
                save_last(st, cfg, info, stop)
            raise TrainingStopped(f"interrupted: {st.where()} is saved in {st.last}; "
                                  f"continue with --resume", 130) from None
        finally:
            batches.close()


def train_stage(cfg: TrainConfig, number: int, out: Path, info: DistInfo,
                state: Optional[Dict], stop: StopRequest, progress: bool) -> Path:
    """Train stage `number` to its end, or resume it from `state` (checkpoint.load_train_state,
    checked with check_resume_settings); returns its directory. Raises TrainingStopped (the
    last completed step saved) or NonFiniteLoss (nothing of the bad step saved)."""
    stage_dir = out / f"stage{number}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if state is not None and finished(state, cfg, number):
        log.info(f"stage {number} is done (step {state['step']}/{state['total']}); skipping it")
        return stage_dir
    st = build_stage(cfg, number, out, info, state)
    if st.step > st.total:
        flag = "--iters" if number == 1 else "--stage2-iters"
        raise ValueError(f"{stage_dir} is at step {st.step}, beyond the {st.total} steps asked "
                         f"for; pass {flag} {st.step} or more")
    if state is not None and info.is_main:
        trim_log(stage_dir / "metrics.jsonl", st.step)
    writer = make_writer(stage_dir, st.step if state else None) if info.is_main else None
    log.info(f"stage {number}: {cfg.model}, {'from step %d, ' % st.step if st.step else ''}"
             f"{st.total} steps of global batch {st.global_batch} ({cfg.batch_size} x "
             f"{st.accum} accum x {info.world_size} proc), {info.device}, out {stage_dir}")
    try:
        run_steps(st, cfg, info, stop, writer, progress)
    finally:
        if writer:
            writer.close()
    if info.distributed:
        diff = dist_utils.max_weight_diff(st.model, info)
        log.info(f"weights on {info.world_size} ranks differ by at most {diff:g}")
    return stage_dir
