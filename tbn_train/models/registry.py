"""The model registry: one small function per variant, `build_model(name)` to build any of them.

Rows of the TBN-ViT paper's Table 1 (VSPW test mIoU):
  stppm_r101      Spatial-Temporal PPM, ResNet-101 (the VSPW baseline)      37.46
  stppm_swin_l    Spatial-Temporal PPM, Swin-L                              43.63
  bisenet_swin_l  Bilateral Network, Swin-L (no temporal module)            45.73
  tbn_swin_l      Temporal Bilateral Network, Swin-L (stage 2 adds OHEM)    47.17 / 49.85
Smaller siblings: tbn_swin_t, bisenet_swin_t; tbn_tiny, bisenet_tiny, stppm_tiny for tests/demo.
"""

from typing import Callable, Dict, List, Optional

from .backbones import TimmBackbone, csail_resnet_filter
from .base import VideoSegmenter
from .stppm import SpatialTemporalPPM
from .tbn import TemporalBilateralNet

_MODELS: Dict[str, Callable[..., VideoSegmenter]] = {}

# Swin-L as the Swin authors released it for dense prediction: ImageNet-22k, 384, window 12 (the
# weights mmsegmentation's Swin-L configs and the Swin segmentation repository load). The paper
# says only "the pre-trained Swin Transformer-Large provided by Swin Transformer".
_SWIN_L = "swin_large_patch4_window12_384.ms_in22k"

# A Swin small enough to train on a laptop CPU in minutes (random init only: no hub weights).
_TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=7)


def register_model(fn: Callable[..., VideoSegmenter]) -> Callable[..., VideoSegmenter]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def build_model(name: str, num_classes: int = 124, pretrained: Optional[str] = None,
                **kwargs) -> VideoSegmenter:
    """Build a registered variant. pretrained: None (random), "timm" (hub) or a local file.

    Extra keyword arguments go to the model's constructor (e.g. temporal_offsets, fused_chs).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    model = _MODELS[name](num_classes=num_classes, pretrained=pretrained, **kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)  # what a checkpoint needs to rebuild this exact model
    return model


def _swin(name: str, pretrained: Optional[str], **timm_kwargs) -> TimmBackbone:
    # strict_img_size=False: any size divisible by 4 (the model pads to 32); timm pads windows.
    # As mmsegmentation's Swin (see backbones.py): a LayerNorm on each stage read, and every odd
    # block shifts its windows whatever the feature size (always_partition).
    return TimmBackbone(name, (2, 3), pretrained, out_norm=True, strict_img_size=False,
                        always_partition=True, **timm_kwargs)


def _resnet101_os8(pretrained: Optional[str]) -> TimmBackbone:
    # The VSPW baseline's encoder: CSAIL's ResNet-101 with the deep stem (three 3x3 convs,
    # 64-64-128) dilated to output stride 8 (layer3 dilation 2, layer4 4). timm's resnet101s is
    # that architecture (its hub weights: Gluon's ResNet-101-v1s); CSAIL's own
    # resnet101-imagenet.pth loads as a local file, its stem renamed by csail_resnet_filter.
    return TimmBackbone("resnet101s", (3, 4), pretrained, output_stride=8,
                        pretrained_filter_fn=csail_resnet_filter)


@register_model
def tbn_swin_l(num_classes=124, pretrained=None, **kwargs):
    """The paper's model: TBN-ViT with Swin-L (ImageNet-22k, 384, window 12)."""
    return TemporalBilateralNet(_swin(_SWIN_L, pretrained),
                                num_classes, temporal=True, **kwargs)


@register_model
def bisenet_swin_l(num_classes=124, pretrained=None, **kwargs):
    """Bilateral Network with Swin-L: TBN-ViT without the temporal context module."""
    return TemporalBilateralNet(_swin(_SWIN_L, pretrained),
                                num_classes, temporal=False, **kwargs)


@register_model
def stppm_swin_l(num_classes=124, pretrained=None, **kwargs):
    """Spatial-Temporal PPM with a Swin-L backbone (last stage, stride 32)."""
    return SpatialTemporalPPM(_swin(_SWIN_L, pretrained),
                              num_classes, **kwargs)


@register_model
def stppm_r101(num_classes=124, pretrained=None, **kwargs):
    """The VSPW baseline: Spatial-Temporal PPM with the deep-stem ResNet-101 dilated to stride 8."""
    return SpatialTemporalPPM(_resnet101_os8(pretrained), num_classes, **kwargs)


@register_model
def tbn_swin_t(num_classes=124, pretrained=None, **kwargs):
    """TBN-ViT with Swin-T: for one consumer GPU."""
    return TemporalBilateralNet(_swin("swin_tiny_patch4_window7_224", pretrained),
                                num_classes, temporal=True, **kwargs)


@register_model
def bisenet_swin_t(num_classes=124, pretrained=None, **kwargs):
    """Bilateral Network with Swin-T."""
    return TemporalBilateralNet(_swin("swin_tiny_patch4_window7_224", pretrained),
                                num_classes, temporal=False, **kwargs)


_TINY_CHS = dict(spatial_chs=32, context_chs=32, fused_chs=64)


@register_model
def tbn_tiny(num_classes=124, pretrained=None, **kwargs):
    """A tiny TBN (1-block Swin stages, 64-channel features) for tests and the CPU demo."""
    kwargs = {**_TINY_CHS, **kwargs}
    return TemporalBilateralNet(_swin("swin_tiny_patch4_window7_224", pretrained, **_TINY_SWIN),
                                num_classes, temporal=True, **kwargs)


@register_model
def bisenet_tiny(num_classes=124, pretrained=None, **kwargs):
    """The tiny bilateral sibling of tbn_tiny (same budget, no temporal module)."""
    kwargs = {**_TINY_CHS, **kwargs}
    return TemporalBilateralNet(_swin("swin_tiny_patch4_window7_224", pretrained, **_TINY_SWIN),
                                num_classes, temporal=False, **kwargs)


@register_model
def stppm_tiny(num_classes=124, pretrained=None, **kwargs):
    """A tiny ST-PPM on the tiny Swin, for tests."""
    kwargs = {"branch_chs": 32, **kwargs}
    return SpatialTemporalPPM(_swin("swin_tiny_patch4_window7_224", pretrained, **_TINY_SWIN),
                              num_classes, **kwargs)
