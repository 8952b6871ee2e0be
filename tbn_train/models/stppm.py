"""Spatial-Temporal PPM: the VSPW baseline (Miao et al., "VSPW: A Large-scale Dataset for Video
Scene Parsing in the Wild", CVPR 2021), rows 1 and 2 of the TBN-ViT paper's Table 1.

Pyramid pooling (PSPNet) at scales 1, 2, 3, 6 over the target and reference frames' backbone
features; the pooled maps are averaged over the frames, projected by a 1x1 conv-BN-ReLU per scale,
upsampled and concatenated with the target's features; a 3x3 conv, dropout and the classifier.
frame_features is the backbone's last stage, so the split and the feature ring work as for TBN.
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import TimmBackbone
from .base import VideoSegmenter
from .blocks import SegHead


class PPMBranch(nn.Module):
    """One pyramid scale: pool every frame to s x s, average over frames, 1x1 conv, BN, ReLU.

    BN and ReLU run after the upsample: BN over a 1 x 1 map has one value per channel at batch
    size 1 (one clip per GPU, as the paper trains), which BatchNorm cannot normalise. The 1x1
    conv is linear, so conv-then-upsample equals upsample-then-conv; only BN's statistics move.
    """

    def __init__(self, in_chs: int, out_chs: int, scale: int):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, frames: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        pooled = torch.stack([F.adaptive_avg_pool2d(f, self.scale) for f in frames], 0).mean(0)
        up = F.interpolate(self.conv(pooled), size=size, mode="bilinear", align_corners=False)
        return F.relu(self.bn(up))


class SpatialTemporalPPM(VideoSegmenter):
    """ST-PPM over a timm backbone's last stage (ResNet-101 dilated to stride 8, or Swin)."""

    def __init__(self, backbone: TimmBackbone, num_classes: int = 124,
                 temporal_offsets: Sequence[int] = (3, 6, 9), scales: Sequence[int] = (1, 2, 3, 6),
                 branch_chs: int = 512, dropout: float = 0.1):
        super().__init__(num_classes)
        self.temporal_offsets = tuple(temporal_offsets)
        self.backbone = backbone
        self.feature_stride = backbone.reductions[-1]
        self.size_divisor = max(32, self.feature_stride)
        in_chs = backbone.channels[-1]
        self.feature_chs = in_chs
        self.branches = nn.ModuleList(PPMBranch(in_chs, branch_chs, s) for s in scales)
        self.classifier = SegHead(in_chs + len(scales) * branch_chs, branch_chs, num_classes,
                                  dropout=dropout)

    def _encode(self, padded: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.backbone(padded)[-1], []

    def _head(self, current: torch.Tensor, past: List[torch.Tensor]) -> torch.Tensor:
        frames = [current] + past
        size = current.shape[-2:]
        return self.classifier(torch.cat([current] + [b(frames, size) for b in self.branches], 1))

    def context_parameters(self) -> List[nn.Parameter]:
        return list(self.backbone.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
