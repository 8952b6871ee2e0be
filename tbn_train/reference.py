"""The clip-inference reference: model(clip) on the clip of every frame, the naive pipeline.

For frame t the clip is the frames `tbn_runtime.temporal.clip_indices(t, offsets)` =
[t-9, t-6, t-3, t] (clamped at the start of the video), and the backbone runs on all four of
them, as the paper describes the model and as VSPW research code tests it. Every faster path --
the feature ring of tbn-eval (`tbn_train.evaluate.predict_video`), the exported engines, the
runtime's backends -- must give these labels; the tests and benchmarks compare against this one
implementation.

    ref = ClipReference(model)            # per video: ref.reset()
    for frame in frames:                  # uint8 H x W x 3 BGR, as decoded
        labels = ref.labels(frame)        # uint8 H x W train ids
"""

from __future__ import annotations

from collections import deque
from typing import Deque

import numpy as np
import torch

from tbn_runtime.preprocess import MEAN_RGB, STD_RGB
from tbn_runtime.temporal import clip_indices


class ClipReference:
    """model(clip) frame by frame, keeping the last max(offsets) + 1 normalised frames.

    device: where the model runs (the model is moved there); fp16: CUDA autocast in fp16;
    bf16: autocast in bf16 (CUDA or CPU), as a PyTorch user would run the model in bf16.
    Frames are normalised as `tbn_runtime.preprocess.normalize_bgr` (and the exported graph)
    do: BGR -> RGB, float, subtract the mean, divide by the std.
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu", fp16: bool = False,
                 bf16: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.offsets = tuple(getattr(model, "temporal_offsets", ()))
        self.fp16 = fp16
        self.bf16 = bf16 and not fp16
        self.mean = torch.tensor(MEAN_RGB, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD_RGB, device=self.device).view(1, 3, 1, 1)
        #: the normalised frames the next clips need, oldest first (1 x 3 x H x W each)
        self.normalized: Deque[torch.Tensor] = deque(maxlen=max(self.offsets, default=0) + 1)
        self.t = -1

    def reset(self) -> None:
        """Start a new video."""
        self.normalized.clear()
        self.t = -1

    @torch.no_grad()
    def logits(self, frame: np.ndarray) -> torch.Tensor:
        """1 x K x H x W logits of the next frame of the video (on the model's device)."""
        self.t += 1
        x = torch.from_numpy(np.ascontiguousarray(frame))[None].to(self.device)
        self.normalized.append((x.flip(-1).permute(0, 3, 1, 2).float() - self.mean) / self.std)
        # frame i of the video sits at position i - (t + 1 - len) of the deque
        first = self.t + 1 - len(self.normalized)
        idx = clip_indices(self.t, self.offsets) if self.offsets else [self.t]
        clip = torch.cat([self.normalized[i - first] for i in idx])[None]
        dtype = torch.bfloat16 if self.bf16 else torch.float16
        where = "cuda" if self.fp16 else self.device.type  # fp16 autocast: CUDA only, as before
        with torch.autocast(where, dtype=dtype, enabled=self.fp16 or self.bf16):
            return self.model(clip)

    def labels(self, frame: np.ndarray) -> np.ndarray:
        """uint8 H x W train ids of the next frame (argmax of the logits)."""
        return self.logits(frame)[0].argmax(0).to(torch.uint8).cpu().numpy()
