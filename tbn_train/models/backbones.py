"""timm backbones for the context path, with their pretrained weights from the hub or a file.

The backbone is a whole timm model pruned to the stages we read (`prune_intermediate_layers`),
run through `forward_intermediates`: NCHW feature maps for Swin and ResNet alike, and timm's
own gradient checkpointing (`set_grad_checkpointing`) for Swin-L on 16 GB cards.

Two choices follow mmsegmentation's Swin backbone (`mmseg/models/backbones/swin.py`), the
reference for Swin in segmentation:
- `out_norm=True` puts a fresh LayerNorm on every stage we read (mmseg's `norm{i}` for each
  out index). The classifier's final LayerNorm, sized for stage 4 only, is pruned, as mmseg
  leaves it out (its pretrained weights have no home there either).
- Swin is built with timm's `always_partition=True`: every odd block shifts its windows at any
  feature size, as mmseg's blocks do. timm otherwise fixes window and shift from `img_size` at
  construction, so with Swin-L's 384 stage 4 (12 x 12, one window) never shifted, whatever the
  input. One difference remains: timm rolls the map and then pads it to whole windows, mmseg
  pads and then rolls; the two agree where a stage's size is a multiple of the window (every
  stage at 384 x 384) and differ in the border windows elsewhere (stages 3-4 at 480).
"""

import os
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from tbn_runtime.errors import TbnError


class BackboneError(TbnError, ValueError):
    """A backbone that cannot be built or loaded as asked; the message says how to fix it."""


class TimmBackbone(nn.Module):
    """The feature maps of some stages of a timm model (classifier and unused stages dropped).

    out_norm: a LayerNorm (over channels, eps 1e-5 as nn.LayerNorm) on each stage read.
    """

    def __init__(self, name: str, out_indices: Sequence[int], pretrained: Optional[str] = None,
                 out_norm: bool = False, **timm_kwargs):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.model = _create(name, pretrained, **timm_kwargs)
        self.model.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        info = self.model.feature_info
        self.channels: List[int] = [info[i]["num_chs"] for i in self.out_indices]
        self.reductions: List[int] = [info[i]["reduction"] for i in self.out_indices]
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in self.channels) \
            if out_norm else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.model.forward_intermediates(x, indices=self.out_indices,
                                                 intermediates_only=True)
        if self.norms is None:
            return feats
        return [norm(f) for norm, f in zip(self.norms, feats)]


# CSAIL's deep-stem ResNet (semantic-segmentation-pytorch, the VSPW baseline's encoder) names its
# three stem convolutions conv1..3 with bn1..3; timm's deep stem is the Sequential conv1.0..6
# followed by bn1. The residual stages have the same names in both.
_CSAIL_STEM = {"conv1.weight": "conv1.0.weight", "bn1.": "conv1.1.",
               "conv2.weight": "conv1.3.weight", "bn2.": "conv1.4.",
               "conv3.weight": "conv1.6.weight", "bn3.": "bn1."}


def csail_resnet_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module
                        ) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn`: a CSAIL deep-stem ResNet checkpoint (e.g. CSAIL's
    resnet101-imagenet.pth) in timm's names; any other checkpoint passes unchanged.

    The classifier of the file (CSAIL's `fc`, the VSPW baseline's `fc_1`) is replaced by the
    model's own: the backbone drops it anyway.
    """
    state_dict = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if "conv3.weight" not in state_dict or "bn3.running_mean" not in state_dict:
        return state_dict  # not CSAIL's layout: timm names already
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("fc.", "fc_1.")):
            continue
        for old, new in _CSAIL_STEM.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    own = model.state_dict()
    out.update({k: own[k] for k in own if k.startswith("fc.")})
    return out


def _create(name: str, pretrained: Optional[str], **timm_kwargs) -> nn.Module:
    """timm.create_model with pretrained=None (random), "timm" (hub) or a local file path."""
    if pretrained in (None, "", False):
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    if pretrained in ("timm", True):
        try:
            return timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as e:  # network, hub or architecture-override errors
            raise BackboneError(
                f"could not load timm's pretrained weights for '{name}' ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); offline, download them once and "
                f"pass the file: pretrained=/path/to/{name}.safetensors") from e
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise BackboneError(f"pretrained backbone file not found: {path} (pass a .safetensors or "
                            f"timm .pth/.bin checkpoint, or pretrained='timm' to download)")
    try:
        # timm's own loader: safetensors or torch.load(weights_only=True), the checkpoint filter
        # of the architecture (Swin's relative-position tables, ...) and classifier handling.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path},
                                 **timm_kwargs)
    except Exception as e:
        raise BackboneError(f"pretrained backbone file {path} does not fit '{name}': "
                            f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from e


# -- inference speed-ups of timm's Swin (the torch backend; labels unchanged, tested) -------------
def cache_window_masks(model: nn.Module) -> int:
    """Compute each shifted-window attention mask once per feature size; returns the blocks.

    Swin is built with strict_img_size=False (any input size), so timm's blocks rebuild their
    mask from the padded map on every call (`dynamic_mask`: a dozen small kernels in each of
    Swin-L's 12 shifted blocks, every frame). The mask depends only on the map's size, device
    and dtype: this memoises timm's own `get_attn_mask` on those, so the values are the same and
    a CUDA graph captures a constant. For inference (the masks are made without autograd).
    """
    from timm.models.swin_transformer import SwinTransformerBlock

    count = 0
    for block in model.modules():
        if not isinstance(block, SwinTransformerBlock) or not getattr(block, "dynamic_mask",
                                                                      False):
            continue
        if getattr(block, "_tbn_mask_cache", None) is not None:
            count += 1
            continue
        original, cache = block.get_attn_mask, {}

        def cached(x=None, device=None, dtype=None, _original=original, _cache=cache):
            if x is None:
                return _original(x, device, dtype)
            key = (x.shape[1], x.shape[2], x.device, x.dtype)
            if key not in _cache:
                with torch.no_grad():
                    _cache[key] = _original(x)
            return _cache[key]

        block.get_attn_mask = cached
        block._tbn_mask_cache = cache
        count += 1
    return count


def set_fused_window_attention(model: nn.Module, enable: bool = True) -> int:
    """Swin's window attention through F.scaled_dot_product_attention (timm's `fused_attn`,
    off by default in timm for Swin as "experimental"); returns the attention layers changed.
    The same arithmetic in one kernel (the bias and mask as its additive attn_mask)."""
    from timm.models.swin_transformer import WindowAttention

    count = 0
    for attn in model.modules():
        if isinstance(attn, WindowAttention):
            attn.fused_attn = bool(enable)
            count += 1
    return count
