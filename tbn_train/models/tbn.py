"""TBN-ViT: Temporal Bilateral Network with Vision Transformer.

"Temporal Bilateral Network with Vision Transformer for Video Scene Parsing" (VSPW 2021
challenge, 49.85% mIoU on the VSPW test set; paper in shared/paper/tbn-vit.txt).

  spatial path:  three 3x3 stride-2 ConvBNReLU -> 1/8, keeps detail
  context path:  Swin (timm) stages at 1/16 and 1/32 -> ARM each, global context on 1/32,
                 merged down to 1/8 as in BiSeNet
  FFM:           fuses both paths into F_t (1/8): what the feature engine computes per frame
  temporal head: mean(F_t-3, F_t-6, F_t-9) concatenated with F_t -> classifier -> upsample
The bilateral network (paper Table 1, row 3) is the same model without the temporal module.
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import TimmBackbone
from .base import VideoSegmenter
from .blocks import AttentionRefinementModule, ConvBNReLU, FeatureFusionModule, SegHead, SpatialPath


class ContextPath(nn.Module):
    """Backbone stages at 1/16 and 1/32, refined by ARMs and merged down to 1/8 (BiSeNet V1)."""

    def __init__(self, backbone: TimmBackbone, out_chs: int = 128):
        super().__init__()
        self.backbone = backbone
        ch16, ch32 = backbone.channels[-2:]
        self.arm16 = AttentionRefinementModule(ch16, out_chs)
        self.arm32 = AttentionRefinementModule(ch32, out_chs)
        self.conv_avg = ConvBNReLU(ch32, out_chs, 1)  # global context of the 1/32 branch
        self.head32 = ConvBNReLU(out_chs, out_chs, 3)
        self.head16 = ConvBNReLU(out_chs, out_chs, 3)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (context at 1/8, context at 1/16)."""
        feat16, feat32 = self.backbone(x)[-2:]
        # Global average as a mean over H, W (one ReduceMean in ONNX), broadcast instead of
        # upsampled: adding a 1x1 map is exactly BiSeNet's nearest upsample of it.
        context = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        feat32 = self.arm32(feat32) + context
        # Fixed scale factors (not target sizes): the padded input makes every stage exactly
        # half the one before, and a constant factor exports as a static Resize.
        feat32_up = self.head32(F.interpolate(feat32, scale_factor=2.0, mode="nearest"))
        feat16 = self.arm16(feat16) + feat32_up
        feat16_up = self.head16(F.interpolate(feat16, scale_factor=2.0, mode="nearest"))
        return feat16_up, feat32_up


class TemporalBilateralNet(VideoSegmenter):
    """TBN-ViT (temporal=True) or the Bilateral Network with a ViT context path (temporal=False)."""

    def __init__(self, backbone: TimmBackbone, num_classes: int = 124, temporal: bool = True,
                 temporal_offsets: Sequence[int] = (3, 6, 9), spatial_chs: int = 128,
                 context_chs: int = 128, fused_chs: int = 256, aux_heads: bool = True,
                 reference_frames: str = "past"):
        super().__init__(num_classes, reference_frames)
        self.temporal_offsets = tuple(temporal_offsets) if temporal else ()
        self.spatial_path = SpatialPath(spatial_chs, mid_chs=min(64, spatial_chs))
        self.context_path = ContextPath(backbone, context_chs)
        self.ffm = FeatureFusionModule(spatial_chs + context_chs, fused_chs)
        self.feature_chs = fused_chs
        # The temporal context module: [F_t, mean(past)] -> ConvBNReLU -> 1x1 to classes.
        head_in = 2 * fused_chs if temporal else fused_chs
        self.classifier = SegHead(head_in, fused_chs, num_classes)
        # BiSeNet's auxiliary heads on the context path (training only; not exported).
        self.aux16 = SegHead(context_chs, 64, num_classes) if aux_heads else None
        self.aux32 = SegHead(context_chs, 64, num_classes) if aux_heads else None

    def _encode(self, padded: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        spatial = self.spatial_path(padded)
        context8, context16 = self.context_path(padded)
        return self.ffm(spatial, context8), [context8, context16]

    def _head(self, current: torch.Tensor, past: List[torch.Tensor]) -> torch.Tensor:
        if self.temporal_offsets:
            # The average is order-free: the past frames are interchangeable by design.
            x = torch.cat([current, torch.stack(past, 0).mean(0)], dim=1)
        else:
            x = current
        return self.classifier(x)

    def aux_logits(self, aux_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.aux16 is None:
            return []
        return [self.aux16(aux_feats[0]), self.aux32(aux_feats[1])]

    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.context_path.backbone.parameters())

    def context_parameters(self) -> List[nn.Parameter]:
        """The whole context path: Swin, both ARMs, the global context and the merging convs.

        The paper's stage 2 gives "the context path" 0.0002 and "other layers" 0.0005. The
        paper's Sec. 2.1 describes the ARMs as part of the context path, and BiSeNet's context
        path (CoinCheung/BiSeNet's ContextPath) holds the backbone, the ARMs, the global-context
        conv and the merging heads; the spatial path, FFM, classifier and auxiliary heads are
        the other layers.
        """
        return list(self.context_path.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.context_path.backbone.set_grad_checkpointing(enable)
