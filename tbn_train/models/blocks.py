"""BiSeNet building blocks, as BiSeNet (Yu et al., ECCV 2018) and the TBN-ViT paper define them.

Small modules, built bottom-up: ConvBNReLU -> SpatialPath, AttentionRefinementModule,
FeatureFusionModule, SegHead. Every op here exports to ONNX as plain Conv/BN/ReLU/Sigmoid/
ReduceMean, so TensorRT fuses BN into the convolutions.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    """k x k convolution (no bias: BN follows), BatchNorm, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class SpatialPath(nn.Sequential):
    """Three 3x3 stride-2 ConvBNReLU layers: the image at 1/8 resolution, rich in detail.

    BiSeNet's spatial path uses a 7x7 first layer and a 1x1 output layer; the TBN-ViT paper
    specifies three 3x3 stride-2 layers, which is what this is.
    """

    def __init__(self, out_chs: int = 128, mid_chs: int = 64):
        super().__init__(
            ConvBNReLU(3, mid_chs, 3, stride=2),
            ConvBNReLU(mid_chs, mid_chs, 3, stride=2),
            ConvBNReLU(mid_chs, out_chs, 3, stride=2),
        )


class AttentionRefinementModule(nn.Module):
    """ARM: 3x3 ConvBNReLU, then reweight channels by sigmoid(BN(1x1(global average pool)))."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chs, out_chs, 3)
        self.conv_atten = nn.Conv2d(out_chs, out_chs, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        # mean over H, W (not adaptive_avg_pool2d): exports as one ReduceMean for any size.
        atten = feat.mean(dim=(2, 3), keepdim=True)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(atten)))
        return feat * atten


class FeatureFusionModule(nn.Module):
    """FFM: concat(spatial, context) -> 1x1 ConvBNReLU -> out = x + x * channel attention."""

    def __init__(self, in_chs: int, out_chs: int, reduction: int = 4):
        super().__init__()
        self.conv = ConvBNReLU(in_chs, out_chs, 1)
        self.fc1 = nn.Conv2d(out_chs, out_chs // reduction, 1)
        self.fc2 = nn.Conv2d(out_chs // reduction, out_chs, 1)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([spatial, context], dim=1))
        atten = x.mean(dim=(2, 3), keepdim=True)
        atten = torch.sigmoid(self.fc2(F.relu(self.fc1(atten))))
        return x + x * atten


class SegHead(nn.Sequential):
    """BiSeNet's output head: 3x3 ConvBNReLU then a 1x1 classifier (logits at feature scale)."""

    def __init__(self, in_chs: int, mid_chs: int, num_classes: int, dropout: float = 0.0):
        layers = [ConvBNReLU(in_chs, mid_chs, 3)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers.append(nn.Conv2d(mid_chs, num_classes, 1))
        super().__init__(*layers)
