"""Spatial-Temporal PPM: the VSPW baseline (Miao et al., "VSPW: A Large-scale Dataset for Video
Scene Parsing in the Wild", CVPR 2021), rows 1 and 2 of the TBN-ViT paper's Table 1.

As the baseline's `models/clip_psp.py` (VSPW-dataset/VSPW_baseline) builds it: pyramid pooling
(PSPNet) at scales 1, 2, 3, 6 over the target and reference frames' last-stage features; per
scale the pooled maps are averaged over the frames, then a 1x1 conv, BN and ReLU at the pooled
size, then a bilinear upsample; the branches are concatenated with the target's features and
classified by a 3x3 conv-BN-ReLU, dropout 0.1 and a 1x1 conv. Deep supervision: a second head
(3x3 conv-BN-ReLU, dropout 0.1, 1x1 conv) on the second-last stage (ResNet's layer3), weighted
0.4 in training (`aux_weight`). frame_features is the last stage, so the split and the feature
ring work as for TBN.

BatchNorm at the 1 x 1 scale sees one value per channel and clip: training needs 2 clips per
BatchNorm (the baseline trained 2 per GPU with SyncBatchNorm over 4 GPUs), and says so otherwise.
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import TimmBackbone
from .base import VideoSegmenter
from .blocks import ConvBNReLU, SegHead


class PPMBranch(nn.Module):
    """One pyramid scale: pool every frame to s x s, average over frames, 1x1 conv-BN-ReLU at
    s x s, then upsample (the baseline's order: BN normalises the pooled map)."""

    def __init__(self, in_chs: int, out_chs: int, scale: int):
        super().__init__()
        self.scale = scale
        self.conv = ConvBNReLU(in_chs, out_chs, 1)

    def forward(self, frames: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        pooled = torch.stack([F.adaptive_avg_pool2d(f, self.scale) for f in frames], 0).mean(0)
        bn = self.conv[1]
        if self.training and pooled.shape[0] * self.scale ** 2 == 1 and \
                type(bn) is nn.BatchNorm2d:  # SyncBatchNorm pools the statistics of all GPUs
            raise ValueError("ST-PPM's 1x1 pyramid BatchNorm sees one value per channel with one "
                             "clip per batch: train with --batch-size 2 or more (and "
                             "--global-batch a multiple of it), or SyncBatchNorm on several GPUs")
        return F.interpolate(self.conv(pooled), size=size, mode="bilinear", align_corners=False)


class SpatialTemporalPPM(VideoSegmenter):
    """ST-PPM over a timm backbone's last stage (ResNet-101 dilated to stride 8, or Swin)."""

    def __init__(self, backbone: TimmBackbone, num_classes: int = 124,
                 temporal_offsets: Sequence[int] = (3, 6, 9), scales: Sequence[int] = (1, 2, 3, 6),
                 branch_chs: int = 512, dropout: float = 0.1, aux_heads: bool = True,
                 reference_frames: str = "past"):
        super().__init__(num_classes, reference_frames)
        self.temporal_offsets = tuple(temporal_offsets)
        self.backbone = backbone
        self.feature_stride = backbone.reductions[-1]
        self.size_divisor = max(32, self.feature_stride)
        in_chs = backbone.channels[-1]
        self.feature_chs = in_chs
        self.branches = nn.ModuleList(PPMBranch(in_chs, branch_chs, s) for s in scales)
        self.classifier = SegHead(in_chs + len(scales) * branch_chs, branch_chs, num_classes,
                                  dropout=dropout)
        # The baseline's deep supervision: layer3 (1024 channels) -> 512 -> classes.
        aux_in = backbone.channels[-2]
        self.deepsup = SegHead(aux_in, aux_in // 2, num_classes, dropout=dropout) \
            if aux_heads else None

    def _encode(self, padded: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats = self.backbone(padded)
        return feats[-1], feats[-2:-1]

    def _head(self, current: torch.Tensor, past: List[torch.Tensor]) -> torch.Tensor:
        frames = [current] + past
        size = current.shape[-2:]
        return self.classifier(torch.cat([current] + [b(frames, size) for b in self.branches], 1))

    def aux_logits(self, aux_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        return [] if self.deepsup is None else [self.deepsup(aux_feats[0])]

    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.backbone.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
