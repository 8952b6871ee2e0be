"""Train one stage: its steps, log lines, evaluations, saves and stops.

`train_stage` builds the stage (tbn_train.stage) and runs the loop (`run_steps`) of small
top-level functions: one optimizer step (`train_step`), its log line (`log_step`),
`evaluate_and_save`, `save_last`, and the stop point every process reaches (`halt_if_asked`).

What is saved, and when: last.safetensors + last.state.pt at every evaluation, every
`save_minutes`, at the end of the stage, and before any early stop (a signal, a data error in
training or evaluation); best.safetensors at each new best val mIoU. A stop is decided between
two steps, by all processes together; a step cut short by an exception (a second Ctrl-C) has its
BatchNorm statistics undone before the save. A non-finite loss saves nothing: the last save is
the last good state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from tbn_runtime.files import atomic_write, disk_full, disk_full_error

from . import distributed as dist_utils
from . import losses
from .checkpoint import save_checkpoint, save_train_state
from tbn_runtime.console import progress_bar
from .config import TrainConfig
from .distributed import DistInfo
from .errors import DatasetError, LoaderDied, NonFiniteLoss, TrainingStopped, worker_died
from .evaluate import evaluate_model
from .preemption import StopRequest
from .stage import Stage, build_stage, finished, micro_batches, micro_seed, snapshot

log = logging.getLogger(__name__)


# -- saves ---------------------------------------------------------------------------------------
def save_last(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest,
              done: bool = False) -> None:
    """Write last.safetensors and last.state.pt (rank 0), never cut in half by a signal."""
    with stop.critical():
        save_checkpoint(str(st.last), st.model, cfg.to_dict(),
                        {"stage": st.number, "step": st.step})
        save_train_state(str(st.dir / "last.state.pt"), snapshot(st, info, done))
    st.saved_step, st.saved_at, st.done = st.step, time.monotonic(), done
    log.debug(f"saved {st.where()} in {st.last}")


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
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise disk_full_error(str(path), e) if disk_full(e) else e


# -- one step, its log line, evaluation -----------------------------------------------------------
def fetch(batches: Iterator, accum: int) -> Tuple[List, Optional[DatasetError]]:
    """This process's micro-batches of the next step, or the data error met reading them."""
    micro: List = []
    try:
        for _ in range(accum):
            micro.append(next(batches))
    except DatasetError as e:
        return micro, e
    except (RuntimeError, OSError) as e:  # a worker killed (small /dev/shm) or failed
        if not worker_died(e):
            raise
        return micro, LoaderDied(e)
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
        except (RuntimeError, OSError) as e:
            # torch's SIGCHLD handler raises a training worker's death wherever the main process
            # is, here in evaluation (the loader keeps its workers prefetching meanwhile)
            if not worker_died(e):
                raise
            summary, error = None, LoaderDied(e)
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


def save_before_stopping(st: Stage, cfg: TrainConfig, info: DistInfo,
                         stop: StopRequest) -> str:
    """Rank 0 saves the last completed step (unless last.* holds it, or there is none yet);
    returns what to tell the user."""
    if st.step == 0 and st.saved_step < 0:
        return (f"stage {st.number} stopped before its first step (nothing to save); " +
                ("run the command again" if st.number == 1 else "continue with --resume"))
    if info.is_main and st.saved_step != st.step:
        save_last(st, cfg, info, stop)
    return f"{st.where()} is saved in {st.last}; continue with --resume"


def halt_if_asked(st: Stage, cfg: TrainConfig, info: DistInfo, stop: StopRequest,
                  error: Optional[DatasetError]) -> None:
    """Every process calls this between two steps. If any was signalled or met a data error,
    all stop here, at the same step: rank 0 saves it and every process raises TrainingStopped."""
    stop_any, error_any = dist_utils.any_rank([stop.requested, error is not None], info)
    if not (stop_any or error_any):
        return
    told = save_before_stopping(st, cfg, info, stop)
    dist_utils.barrier(info)
    if error is not None:
        if error.worker_traceback:
            log.debug(error.worker_traceback)
        raise TrainingStopped(f"{error}. Training stopped: {told}", 2, logging.ERROR)
    if error_any:
        raise TrainingStopped(f"a data error in another process stopped training: {told}", 2,
                              logging.ERROR)
    cause = stop.name if stop.requested else "a signal to another process"
    raise TrainingStopped(f"{cause}: stopped; {told}", stop.exit_code)


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
            raise TrainingStopped(f"interrupted; {save_before_stopping(st, cfg, info, stop)}",
                                  130) from None
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
