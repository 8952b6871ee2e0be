"""tbn-train: train TBN-ViT or any Table 1 variant, in the paper's two stages.

    tbn-train --preset demo                                  # tbn_tiny on data/synth, CPU minutes
    tbn-train --preset tbn_swin_l --data /data/VSPW --stage all
    torchrun --nproc-per-node 8 -m tbn_train.train --preset tbn_swin_l --data /data/VSPW
    tbn-train --preset demo --resume                         # continue OUT/stage*/last.*

Stage 1: cross-entropy (ignore 255), SGD with momentum, poly decay, one lr. Stage 2 starts from
stage 1's best weights (last if no eval improved) with OHEM and two lrs (context path /
the rest). Outputs: OUT/stage{1,2}/{best,last}.safetensors, last.state.pt (optimizer,
scheduler, step, RNG, best mIoU: what --resume needs), metrics.jsonl; OUT/best.safetensors and
OUT/last.safetensors are copies of the last stage run's (tbn-export reads OUT/best).

Several processes (torchrun, env:// init, nccl on CUDA / gloo on CPU): each process trains
batch_size clips per micro-step; the global batch is batch_size * accum * processes, and a
run with the same global batch gives the same result however it is split (tbn_train.sampling).
SyncBatchNorm replaces BatchNorm on CUDA when there are several processes.

Memory: --no-past-grad runs the 3 past frames of each clip without autograd, so only the
current frame's activations are kept for the backward pass: about three quarters of the
backbone's activation memory saved, at the price of no gradient through the past frames'
features (the temporal head still learns from them). --grad-checkpointing recomputes Swin's
blocks in the backward pass instead of storing them.
Exit codes: 0 done, 2 user mistake (one line), 3 non-finite loss, 130 interrupted (last saved).
"""

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from tbn_runtime.files import atomic_write

from . import losses
from . import distributed as dist_utils
from .checkpoint import CheckpointError, load_model, read_metadata, save_checkpoint
from .config import TrainConfig, add_override_args, make_config, overrides_from_args
from .data.vspw import DatasetError, VSPWClips
from .distributed import DistInfo
from .evaluate import evaluate_model
from .models import build_model
from .optim import build_optimizer, lr_factor
from .sampling import GlobalBatchSampler, SeededItems


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    pass


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


def build_loader(cfg: TrainConfig, model, info: DistInfo, accum: int):
    dataset = VSPWClips(cfg.data, cfg.train_split, offsets=model.temporal_offsets,
                        crop_size=tuple(cfg.crop_size), scale_range=tuple(cfg.scale_range),
                        flip=cfg.flip, train=True, reference=model.reference_frames,
                        reverse_prob=cfg.temporal_reverse)
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, accum, info.world_size,
                                 info.rank, cfg.seed)
    loader = torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler,
                                         num_workers=cfg.workers,
                                         generator=torch.Generator().manual_seed(cfg.seed),
                                         pin_memory=info.device.type == "cuda")
    return loader, sampler


def micro_batches(loader, sampler: GlobalBatchSampler, start_step: int):
    """Micro-batches from global step `start_step` on, epoch after epoch."""
    epoch, offset = divmod(start_step, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, offset)
        yield from loader
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


# -- checkpoints ----------------------------------------------------------------------------------
def save_last(stage_dir: Path, model, cfg: TrainConfig, state: Dict) -> None:
    save_checkpoint(str(stage_dir / "last.safetensors"), model, cfg.to_dict(),
                    {"stage": state["stage"], "step": state["step"]})
    atomic_write(str(stage_dir / "last.state.pt"), lambda tmp: torch.save(state, tmp))


def load_state(stage_dir: Path) -> Optional[Dict]:
    path = stage_dir / "last.state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({e.__class__.__name__}); delete "
                              f"{stage_dir} to start the stage again") from e
    step = read_metadata(str(stage_dir / "last.safetensors"))["extra"].get("step")
    if step != state.get("step"):
        raise CheckpointError(f"{path} (step {state.get('step')}) does not belong to "
                              f"{stage_dir / 'last.safetensors'} (step {step}); delete "
                              f"{stage_dir} to start the stage again")
    return state


def append_jsonl(path: Path, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C while the optimizer updates, so a saved state is never half a step."""
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *a: caught.append(True))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


# -- one stage ------------------------------------------------------------------------------------
def train_stage(cfg: TrainConfig, stage: int, out: Path, info: DistInfo, resume: bool) -> Path:
    """Run one stage to its end; returns its stage dir."""
    stage_dir = out / f"stage{stage}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(stage_dir) if resume else None
    if state is None and info.is_main:  # a fresh start: no stale best or log of an older run
        for name in ("best.safetensors", "metrics.jsonl"):
            (stage_dir / name).unlink(missing_ok=True)
    model = create_model(cfg, stage, out, resume and state is not None).to(info.device)
    model.train()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    accum = resolve_accum(cfg, info.world_size)
    check_batchnorm_batch(cfg, model, info)
    loader, sampler = build_loader(cfg, model, info, accum)
    iters = cfg.iters if stage == 1 else cfg.stage2_iters
    total = iters if iters > 0 else cfg.epochs * sampler.steps_per_epoch
    criterion = losses.make_criterion(cfg.loss if stage == 1 else cfg.stage2_loss,
                                      cfg.ohem_thresh, cfg.ohem_min_kept)
    optimizer = build_optimizer(model, cfg, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    use_amp = cfg.amp != "none" and info.device.type == "cuda"
    if cfg.amp != "none" and not use_amp and info.is_main:
        print(f"tbn-train: amp {cfg.amp} needs CUDA; training in fp32 on {info.device}")
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
    step, best = 0, -1.0
    if state is not None:
        if state["global_batch"] != cfg.batch_size * accum * info.world_size:
            raise ValueError(f"{stage_dir} was trained with global batch {state['global_batch']}"
                             f"; resume with the same global batch")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if info.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], info.device)
        step, best = state["step"], state["best_miou"]
    ddp = model
    if info.distributed:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        unused = cfg.aux_weight == 0 and getattr(model, "aux16", None) is not None
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=unused)

    def snapshot(done: bool) -> Dict:
        return {"stage": stage, "step": step, "total": total, "done": done, "best_miou": best,
                "global_batch": cfg.batch_size * accum * info.world_size,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": (torch.cuda.get_rng_state(info.device)
                             if info.device.type == "cuda" else None)}

    def evaluate_and_save(done: bool) -> None:
        nonlocal best
        if info.is_main:
            summary = evaluate_model(model, cfg.data, cfg.val_split, info.device)
            model.train()
            miou = summary["mIoU"] if summary["mIoU"] is not None else -1.0
            append_jsonl(stage_dir / "metrics.jsonl", {
                "stage": stage, "step": step, "eval": cfg.val_split,
                **{k: summary[k] for k in ("mIoU", "pixel_acc", "mVC8", "mVC16", "frames")}})
            if writer:
                writer.add_scalar(f"stage{stage}/val_mIoU", miou, step)
            bar.write(f"stage {stage} step {step}/{total}: val mIoU {miou:.2f} "
                      f"mVC8 {summary['mVC8'] or 0:.2f} (best {max(best, miou):.2f})")
            if miou > best:
                best = miou
                save_checkpoint(str(stage_dir / "best.safetensors"), model, cfg.to_dict(),
                                {"stage": stage, "step": step, "val_mIoU": miou})
            save_last(stage_dir, model, cfg, snapshot(done))
        dist_utils.barrier(info)

    writer = make_writer(stage_dir) if info.is_main else None
    bar = make_bar(total, step, stage, info.is_main)
    if info.is_main:
        print(f"tbn-train: stage {stage}, {cfg.model}, {total} steps of global batch "
              f"{cfg.batch_size * accum * info.world_size} ({cfg.batch_size} x {accum} accum x "
              f"{info.world_size} proc), {info.device}, out {stage_dir}")
    batches = micro_batches(loader, sampler, step)
    log_loss, log_n, t_log = 0.0, 0, time.perf_counter()
    buffers = None
    try:
        while step < total:
            buffers = [b.detach().clone() for b in model.buffers()]  # BN stats, for Ctrl-C
            loss_sum = torch.zeros((), device=info.device)
            for a in range(accum):
                clip, label = next(batches)
                # Stochastic depth etc. draw from a seed of (step, global micro-batch): the
                # same however the global batch is split over processes and accumulation,
                # and nothing to restore on resume.
                torch.manual_seed(micro_seed(cfg.seed, stage, step, a * info.world_size +
                                             info.rank))
                clip = clip.to(info.device, non_blocking=True)
                label = label.to(info.device, non_blocking=True)
                sync = ddp.no_sync() if (info.distributed and a < accum - 1) else \
                    contextlib.nullcontext()
                with sync:
                    with torch.autocast(info.device.type, dtype=amp_dtype, enabled=use_amp):
                        logits, aux = ddp(clip, aux=True, past_grad=cfg.past_grad)
                    loss = losses.total_loss(criterion, logits, aux, label,
                                             cfg.aux_weight)["loss"] / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            loss_sum = dist_utils.mean_over_ranks(loss_sum, info)
            if not math.isfinite(loss_sum.item()):
                raise NonFiniteLoss(f"loss is {loss_sum.item()} at stage {stage} step "
                                    f"{step + 1}; stopped without saving, the last good "
                                    f"checkpoint is {stage_dir / 'last.safetensors'} (lower "
                                    f"--lr, then --resume)")
            with defer_sigint():
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                buffers = None
            log_loss, log_n = log_loss + loss_sum.item(), log_n + 1
            bar.update(1)
            if info.is_main and (step % cfg.log_interval == 0 or step == total):
                rate = log_n / (time.perf_counter() - t_log)
                lr = optimizer.param_groups[-1]["lr"]
                record = {"stage": stage, "step": step, "loss": log_loss / log_n, "lr": lr,
                          "it_s": rate}
                append_jsonl(stage_dir / "metrics.jsonl", record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", it_s=f"{rate:.2f}")
                if writer:
                    writer.add_scalar(f"stage{stage}/loss", record["loss"], step)
                    writer.add_scalar(f"stage{stage}/lr", lr, step)
                log_loss, log_n, t_log = 0.0, 0, time.perf_counter()
            if step % cfg.eval_interval == 0 or step == total:
                evaluate_and_save(done=step == total)
    except KeyboardInterrupt:
        if buffers is not None:  # interrupted inside a step: undo its BN statistics
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        if info.is_main:
            save_last(stage_dir, model, cfg, snapshot(False))
        raise Interrupted(f"interrupted at stage {stage} step {step}/{total}; saved "
                          f"{stage_dir / 'last.safetensors'}; continue with --resume")
    finally:
        bar.close()
        if writer:
            writer.close()
    if info.distributed:
        diff = dist_utils.max_weight_diff(model, info)
        if info.is_main:
            print(f"tbn-train: weights on {info.world_size} ranks differ by at most {diff:g}")
    return stage_dir


def make_writer(stage_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(stage_dir / "tb"))


def make_bar(total: int, initial: int, stage: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"stage {stage}", disable=not enabled,
                dynamic_ncols=True)


def stage_done(stage_dir: Path) -> bool:
    path = stage_dir / "last.state.pt"
    return path.is_file() and bool(torch.load(path, map_location="cpu",
                                              weights_only=True).get("done"))


def publish(stage_dir: Path, out: Path) -> None:
    """Copy a stage's best (else last) and last checkpoints to OUT/."""
    best = stage_dir / "best.safetensors"
    last = stage_dir / "last.safetensors"
    for src, dst in ((best if best.is_file() else last, out / "best.safetensors"),
                     (last, out / "last.safetensors")):
        atomic_write(str(dst), lambda tmp, src=src: shutil.copyfile(src, tmp))


# -- command line ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + error by default)
        raise ValueError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tbn-train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", help="a packaged config (tbn_train/configs/NAME.yaml)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--stage", default="all", choices=["1", "2", "all"],
                   help="all: stage 1, then stage 2 if the config has stage2_iters > 0")
    p.add_argument("--resume", action="store_true", help="continue from OUT/stage*/last.*")
    add_override_args(p)
    return p


def run(cfg: TrainConfig, stage_arg: str, resume: bool, info: DistInfo) -> None:
    if not Path(cfg.data).is_dir():
        raise DatasetError(f"data root {cfg.data} not found; pass --data ROOT (a VSPW folder), "
                           f"or make demo data with: tbn-synth --out data/synth")
    out = Path(cfg.out)
    if stage_arg == "2" and cfg.stage2_iters <= 0:
        raise ValueError("this config has no stage 2 (stage2_iters is 0); pass --stage2-iters N")
    stages = [1, 2] if stage_arg == "all" else [int(stage_arg)]
    stages = [s for s in stages if s == 1 or cfg.stage2_iters > 0]
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    stage_dir = None
    for stage in stages:
        stage_dir = out / f"stage{stage}"
        if resume and stage_done(stage_dir):
            continue
        train_stage(cfg, stage, out, info, resume)
    if info.is_main and stage_dir is not None:
        publish(stage_dir, out)
        print(f"tbn-train: done; best checkpoint {out / 'best.safetensors'}")


def main(argv=None) -> int:
    info = None
    try:
        args = build_parser().parse_args(argv)
        cfg = make_config(args.preset, args.config, overrides_from_args(args))
        info = dist_utils.setup(cfg.device)
        run(cfg, args.stage, args.resume, info)
        return 0
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (DatasetError, CheckpointError, ValueError) as e:
        print(f"tbn-train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"tbn-train: error: {e}", file=sys.stderr)
        return 3
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"tbn-train: {e or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
