"""PyTorch backend: the checkpoint the export came from, a ring of tensors on the device.

Loads `manifest.checkpoint["path"]` (relative paths are tried against the export dir too)
after checking its sha256, and runs `model.frame_features` into the ring slot and
`model.temporal_head` on the current and past slots. On CUDA: fp16 autocast when the export
precision is fp16, and CUDA graphs for both halves (shapes are static), falling back to eager
if capture fails. On the CPU: plain eager. torch and tbn_train are imported only here.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..files import sha256_file
from ..manifest import Manifest
from ..preprocess import MEAN_RGB, STD_RGB
from .base import Backend, BackendError

log = logging.getLogger("tbn_runtime")
_INSTALL = "pip install 'tbn-vit[train]' (torch and timm)"


class _TorchEventClock:
    """Stage timestamps from CUDA events on the current stream (torch.cuda.Event): a CUDA graph
    replay returns before the GPU has finished, so the host clock would charge the feature
    engine's time to the temporal stage, which waits for it."""

    def __init__(self, torch: Any, marks: int = 3) -> None:
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(marks)]

    def mark(self, i: int) -> None:
        self.events[i].record()

    def seconds(self, a: int, b: int) -> float:
        self.events[b].synchronize()
        return self.events[a].elapsed_time(self.events[b]) / 1e3


def _checkpoint_path(export_dir: str, manifest: Manifest) -> str:
    info = manifest.checkpoint or {}
    path = info.get("path")
    if not path:
        raise BackendError(f"the manifest in {export_dir} names no checkpoint; the torch backend "
                           f"needs one (export with tbn-export --checkpoint CKPT)")
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(export_dir, path)]
    for p in candidates:
        if os.path.isfile(p):
            if info.get("sha256") and sha256_file(p) != info["sha256"]:
                raise BackendError(f"checkpoint {p} does not match the sha256 in the manifest of "
                                   f"{export_dir} (changed since export); export again")
            return p
    raise BackendError(f"checkpoint {path} named in the manifest of {export_dir} not found")


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        import importlib.util
        for mod in ("torch", "timm"):
            try:
                if importlib.util.find_spec(mod) is None:
                    return False, f"the torch backend needs {mod}: {_INSTALL}"
            except (ImportError, ValueError):
                return False, f"the torch backend needs {mod}: {_INSTALL}"
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                return False, "torch sees no CUDA device (use --device cpu)"
        return True, "PyTorch"

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cpu",
                 streams: int = 1, cuda_graphs: bool = True,
                 threads: Optional[int] = None) -> None:
        super().__init__(export_dir, manifest, device, streams)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        import torch
        from tbn_train.checkpoint import CheckpointError, load_model

        self._torch = torch
        if threads:  # torch's thread pool is the process's: one worker per process (Ray)
            torch.set_num_threads(int(threads))
        path = _checkpoint_path(export_dir, manifest)
        try:
            model, _ = load_model(path)
        except CheckpointError as e:
            raise BackendError(str(e)) from e
        if tuple(model.temporal_offsets) != tuple(manifest.temporal_offsets):
            raise BackendError(f"checkpoint {path} has temporal offsets {model.temporal_offsets}, "
                               f"the manifest {manifest.temporal_offsets}; export again")
        self.dev = torch.device(device)
        self.model = model.to(self.dev).eval()
        self.autocast = device == "cuda" and manifest.precision == "fp16"
        fdtype = torch.float16 if self.autocast else torch.float32
        shape = tuple(int(d) for d in manifest.feature_shape)
        self._make_rings(lambda: torch.zeros(shape, dtype=fdtype, device=self.dev))
        self._mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=self.dev).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_RGB, dtype=torch.float32, device=self.dev).view(1, 3, 1, 1)
        self._graphs: Optional[Tuple[Any, ...]] = None
        self.graph_note = "eager"
        if device == "cuda":
            self.clock = _TorchEventClock(torch)
        if device == "cuda" and cuda_graphs:
            try:
                self._capture()
                self.graph_note = "CUDA graphs"
            except Exception as e:  # capture is an optimisation: fall back to eager
                self._graphs = None
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.graph_note = "eager (CUDA graph capture failed)"
                log.warning("CUDA graph capture failed (%s); running eager", first)

    # -- the two halves, in torch ---------------------------------------------------------------
    def _features(self, frame_u8: Any) -> Any:
        """uint8 n x H x W x 3 BGR tensor -> features (normalised exactly as normalize_bgr)."""
        x = frame_u8.flip(-1).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        with self._torch.autocast("cuda", dtype=self._torch.float16, enabled=self.autocast):
            return self.model.frame_features(x)

    def _labels(self, current: Any, past: List[Any]) -> Any:
        with self._torch.autocast("cuda", dtype=self._torch.float16, enabled=self.autocast):
            logits = self.model.temporal_head(current, past, out_size=(self.height, self.width))
        return logits.argmax(1).to(self._torch.uint8)

    def _capture(self) -> None:
        torch = self._torch
        n_past = len(self.offsets)
        s_frame = torch.zeros((1, self.height, self.width, 3), dtype=torch.uint8, device=self.dev)
        s_cur = torch.zeros_like(self.ring.storage[0])  # graphs: one frame (one stream) a call
        s_past = [torch.zeros_like(s_cur) for _ in range(n_past)]

        def capture(fn: Callable[[], Any]) -> Tuple[Any, Any]:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                out = fn()
            return graph, out

        g_feat, s_feat = capture(lambda: self._features(s_frame))
        g_temp, s_labels = capture(lambda: self._labels(s_cur, s_past))
        self._graphs = (s_frame, g_feat, s_feat, s_cur, s_past, g_temp, s_labels)

    def describe(self) -> str:
        amp = ", fp16 autocast" if self.autocast else ""
        streams = f", {self.streams} streams batched" if self.streams > 1 else ""
        return (f"torch {self._torch.__version__} on {self.device} ({self.graph_note}{amp}, "
                f"ring of {self.manifest.ring_size} tensors{streams})")

    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(frames)
            if self._graphs is not None and len(slots) == 1:
                s_frame, g_feat, s_feat = self._graphs[:3]
                s_frame.copy_(x, non_blocking=False)
                g_feat.replay()
                out = s_feat
            else:  # eager for batches (the graphs are captured for one frame)
                out = self._features(x.to(self.dev))
            for i, slot in enumerate(slots):
                slot.copy_(out[i:i + 1])

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if self._graphs is not None and len(current) == 1:
                s_cur, s_past, g_temp, s_labels = self._graphs[3:]
                s_cur.copy_(current[0])
                for dst, src in zip(s_past, past[0]):
                    dst.copy_(src)
                g_temp.replay()
                labels = s_labels
            else:
                cur = torch.cat(current)
                columns = [torch.cat([p[k] for p in past]) for k in range(len(self.offsets))]
                labels = self._labels(cur, columns)
            return labels.cpu().numpy()

    def _synchronize(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.synchronize(self.dev)

    def close(self) -> None:
        self._graphs = None
        self.model = None
        self.rings = []
