"""tbn-eval: mIoU, per-class IoU, pixel accuracy, mVC8/16 and frames/s on a VSPW split.

    tbn-eval --checkpoint runs/tbn/best.safetensors --data data/synth [--split val] [--out m.json]
    tbn-eval --pred masks/ --data data/synth [--split val]   # saved palette PNGs (tbn-run's)

`predict_video` is THE PyTorch reference for whole-video inference: each frame's features are
computed once and kept in a ring of max(offsets) + 1 tensors (tbn_runtime.temporal.FeatureRing);
frame t is classified from F_t and F_max(t-k, 0) for k in the model's offsets. This equals
running `model(clip)` on the clip [t-9, t-6, t-3, t] for every frame (the naive pipeline), with
a quarter of the backbone work. The runtime's torch backend and the benchmarks reuse it.
A model trained on future references (`reference_frames == "future"`, the VSPW baseline's
protocol) is evaluated as the baseline's test code does: frame t waits for frame t+9.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

import numpy as np

from tbn_runtime import console as cli
from tbn_runtime.files import atomic_write
from tbn_runtime.masks import read_label_png, write_mask_png
from tbn_runtime.metrics import SegMetrics, format_table
from tbn_runtime.preprocess import normalize_bgr
from tbn_runtime.temporal import FeatureRing

from .errors import DatasetError

if TYPE_CHECKING:
    import torch

# torch, the models and the data reader are imported where they are used: --help answers first.

log = logging.getLogger("tbn_train.evaluate")  # not __main__ under python -m


def _frame_tensors(frames: Iterable[np.ndarray], device) -> Iterator["torch.Tensor"]:
    """Each frame as a normalised 1 x 3 x H x W tensor on `device`; all of one size."""
    import torch

    size = None
    for frame in frames:
        x = torch.from_numpy(normalize_bgr(frame)).unsqueeze(0).to(device)
        h, w = x.shape[-2:]
        if size is None:
            size = (h, w)
        elif size != (h, w):
            raise ValueError(f"frame size {h}x{w} differs from the video's first frame "
                             f"{size[0]}x{size[1]}; all frames of a video must have one size")
        yield x


def predict_logits(model, frames: Iterable[np.ndarray], device) -> Iterator["torch.Tensor"]:
    """Logits (1 x K x H x W, on `device`) of every frame of one video, in order."""
    import torch

    return torch.no_grad()(_ring_logits)(model, frames, device)  # no_grad around each frame


def _ring_logits(model, frames: Iterable[np.ndarray], device) -> Iterator["torch.Tensor"]:
    import torch

    model.eval()
    device = torch.device(device)
    offsets = tuple(model.temporal_offsets)
    if offsets and getattr(model, "reference_frames", "past") == "future":
        yield from _predict_lookahead(model, _frame_tensors(frames, device))
        return
    ring: Optional[FeatureRing] = None
    for x in _frame_tensors(frames, device):
        h, w = x.shape[-2:]
        feat = model.frame_features(x)
        if not offsets:
            yield model.temporal_head(feat, [], out_size=(h, w))
            continue
        if ring is None:
            ring = FeatureRing([torch.empty_like(feat) for _ in range(max(offsets) + 1)], offsets)
        ring.write_target().copy_(feat)
        yield model.temporal_head(feat, ring.past(), out_size=(h, w))


def _predict_lookahead(model, images: Iterator["torch.Tensor"]) -> Iterator["torch.Tensor"]:
    """A "future" model (the VSPW baseline's test protocol): frame t is classified once frame
    t + max(offsets) is in, from `reference_indices(t, frames so far, offsets, "future")`, and
    the last frames of the video read their past. Each frame's features are computed once."""
    from .data.vspw import reference_indices

    offsets, span = tuple(model.temporal_offsets), max(model.temporal_offsets)
    feats: dict = {}
    size, n, t = None, 0, 0

    def head(t: int) -> "torch.Tensor":
        idx = reference_indices(t, n, offsets, "future")  # references first, t last
        return model.temporal_head(feats[t], [feats[i] for i in idx[-2::-1]], out_size=size)

    for x in images:
        size = tuple(x.shape[-2:])
        feats[n], n = model.frame_features(x), n + 1
        while t + span < n:
            yield head(t)
            feats.pop(t - span, None)  # no later frame reads it
            t += 1
    for t in range(t, n):  # the last frames of the video: their references lie in the past
        yield head(t)


def predict_video(model, frames: Iterable[np.ndarray], device) -> Iterator[np.ndarray]:
    """uint8 H x W train-id label maps of every frame (BGR uint8 H x W x 3) of one video."""
    import torch

    for logits in predict_logits(model, frames, device):
        yield logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def evaluate_model(model, root, split: str, device, save_pred: Optional[str] = None,
                   progress: bool = False,
                   should_stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Metrics of `model` on a split (whole videos, the ring), plus frames/s of the model.

    Every mask must hold train ids the model has classes for (DatasetError naming the first
    that does not). `progress`: a bar on stderr. `should_stop`: asked after every frame; when
    it says yes, evaluation ends early and returns None (training stops on a signal).
    """
    from .data.vspw import check_class_count, check_train_ids, index_split, iter_video

    videos = index_split(root, split, with_masks=True)
    fix = (f"the model predicts {model.num_classes} classes: evaluate a checkpoint trained "
           f"on data labelled like this one")
    check_class_count(videos, model.num_classes, fix)
    metrics = SegMetrics(num_classes=model.num_classes)
    seconds, read_seconds, frames = 0.0, 0.0, 0
    n_frames = sum(len(v) for v in videos)
    log.debug(f"evaluating {len(videos)} videos ({n_frames} frames) of split '{split}'")
    with cli.progress_bar(n_frames, "eval", progress, leave=False) as bar:
        for video in videos:
            labels: deque = deque()

            def frames_of(video=video):
                nonlocal read_seconds
                t0 = time.perf_counter()
                for _, frame, label in iter_video(video):
                    labels.append(label)
                    read_seconds += time.perf_counter() - t0
                    yield frame
                    t0 = time.perf_counter()

            preds = predict_video(model, frames_of(), device)
            t0 = time.perf_counter()
            for t, pred in enumerate(preds):
                seconds += time.perf_counter() - t0
                label = labels.popleft()
                check_train_ids(label, model.num_classes, video.masks[t], fix)
                metrics.add_frame(video.name, pred, label)
                if save_pred:
                    write_mask_png(Path(save_pred) / video.name / f"{video.frames[t].stem}.png",
                                   pred)
                frames += 1
                bar.update(1)
                if should_stop is not None and should_stop():
                    return None
                t0 = time.perf_counter()
            metrics.end_video(video.name)
    out = metrics.summary()
    model_seconds = seconds - read_seconds  # the model alone: decoding the JPEGs excluded
    out["frames_per_s"] = frames / model_seconds if model_seconds > 0 else None
    return out


def evaluate_predictions(pred_root, root, split: str) -> dict:
    """Metrics of saved palette PNGs laid out PRED_ROOT/<video>/<frame name>.png."""
    from .data.vspw import index_split, iter_video

    videos = index_split(root, split, with_masks=True)
    metrics = SegMetrics()
    for video in videos:
        for t, frame, label in iter_video(video):
            path = Path(pred_root) / video.name / f"{video.frames[t].stem}.png"
            if not path.is_file():
                raise DatasetError(f"prediction {path} is missing (frame {video.frames[t]}); "
                                   f"predict every frame of split '{split}' (tbn-run writes "
                                   f"PRED_ROOT/<video>/<frame name>.png)")
            try:
                pred = read_label_png(path)
            except (OSError, ValueError) as e:
                raise DatasetError(f"prediction {path} cannot be read: {e}") from e
            if pred.shape != label.shape:
                raise DatasetError(f"prediction {path} is {pred.shape[0]}x{pred.shape[1]} but "
                                   f"its frame is {label.shape[0]}x{label.shape[1]}")
            try:
                metrics.add_frame(video.name, pred, label)
            except ValueError as e:  # values that are not train ids
                raise DatasetError(f"prediction {path}: {e}; predictions are palette PNGs of "
                                   f"train ids, as tbn-run writes them") from e
        metrics.end_video(video.name)
    return metrics.summary()


def build_parser() -> cli.OneLineParser:
    p = cli.OneLineParser(prog="tbn-eval", description=__doc__.split("\n")[0],
                          formatter_class=cli.DefaultsFormatter,
                          epilog="exit codes: 0 done, 2 a mistake in the command, checkpoint "
                                 "or data (one line names it and the fix), 130 interrupted")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a tbn-train checkpoint (.safetensors)")
    src.add_argument("--pred", help="saved predictions: PRED/<video>/<frame name>.png, palette "
                                    "PNGs of train ids (what tbn-run writes)")
    p.add_argument("--data", required=True,
                   help="dataset root in the VSPW layout (val.txt, data/<video>/...)")
    p.add_argument("--split", default="val", help="split to score (ROOT/SPLIT.txt)")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.add_argument("--save-pred", help="with --checkpoint: write the predictions as palette "
                                       "PNGs here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    cli.add_verbosity_flags(p)
    return p


def evaluate(args) -> dict:
    """What tbn-eval computes for its parsed arguments."""
    from .data.vspw import check_data_root

    check_data_root(args.data)
    if args.checkpoint:
        from .checkpoint import load_model
        from .distributed import pick_device

        device = pick_device(args.device)
        model, meta = load_model(args.checkpoint, map_location="cpu")
        model.to(device)
        result = evaluate_model(model, args.data, args.split, device, args.save_pred,
                                progress=cli.show_progress(args.quiet))
        result.update(checkpoint=str(args.checkpoint), model=meta["model"])
    else:
        if args.save_pred:
            raise ValueError("--save-pred goes with --checkpoint")
        if not Path(args.pred).is_dir():
            raise DatasetError(f"prediction folder {args.pred} not found")
        result = evaluate_predictions(args.pred, args.data, args.split)
        result.update(pred=str(args.pred))
    result.update(split=args.split, data=str(args.data))
    return result


def main(argv=None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        cli.setup_logging("tbn-eval", args.verbose, args.quiet)
        result = evaluate(args)
        print(format_table(result))
        if args.out:
            text = json.dumps(result, indent=1) + "\n"
            atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        return 0

    # ValueError: predictions whose values are not train ids, the model's own checks
    return cli.run_command("tbn-eval", body, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
