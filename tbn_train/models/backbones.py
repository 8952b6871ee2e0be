"""timm backbones for the context path, with their pretrained weights from the hub or a file.

The backbone is a whole timm model pruned to the stages we read (`prune_intermediate_layers`),
run through `forward_intermediates`: NCHW feature maps for Swin and ResNet alike, and timm's
own gradient checkpointing (`set_grad_checkpointing`) for Swin-L on 16 GB cards.
"""

import os
from typing import List, Optional, Sequence

import timm
import torch
import torch.nn as nn


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded as asked; the message says how to fix it."""


class TimmBackbone(nn.Module):
    """The feature maps of some stages of a timm model (classifier and unused stages dropped)."""

    def __init__(self, name: str, out_indices: Sequence[int], pretrained: Optional[str] = None,
                 **timm_kwargs):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.model = _create(name, pretrained, **timm_kwargs)
        self.model.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        info = self.model.feature_info
        self.channels: List[int] = [info[i]["num_chs"] for i in self.out_indices]
        self.reductions: List[int] = [info[i]["reduction"] for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices,
                                                intermediates_only=True)


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
