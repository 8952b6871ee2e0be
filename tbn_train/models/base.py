"""The model API shared by every variant, which training, export and the runtime rely on.

A video segmenter is split into two halves that deploy as two engines:
  frame_features(images) -> F            one frame each; computed once per frame and kept
  temporal_head(current, past) -> logits  F_t and [F_t-3, F_t-6, F_t-9] (temporal_offsets order)
forward(clip) runs both over a clip [t-9, t-6, t-3, t] (oldest first) for training and
reference inference; forward(clip) == temporal_head(frame_features(x_t), [frame_features(...)]).

`reference_frames` says which frames a model was trained to read as its references, and so how
it is evaluated: "past" (t-3, t-6, t-9, as CFFM; what the feature ring streams) or "future"
(t+3, t+6, t+9, falling back to the past ones within 9 frames of a video's end: the VSPW
baseline's training clips and test code). The head averages the references, so their order and
direction do not change the graph: only which frames fill the clip.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

REFERENCE_FRAMES = ("past", "future")


class VideoSegmenter(nn.Module):
    """Base class: input padding, the clip layout and the frame/temporal split."""

    #: offsets of the past frames the temporal head reads, e.g. (3, 6, 9); () for image models.
    temporal_offsets: Tuple[int, ...] = (3, 6, 9)
    #: the network's total stride: inputs are padded to a multiple of it (Swin: 32).
    size_divisor: int = 32
    #: stride of frame_features relative to the (padded) input.
    feature_stride: int = 8
    #: "past" or "future": the reference frames the model learns from (see the module doc).
    reference_frames: str = "past"

    def __init__(self, num_classes: int, reference_frames: str = "past"):
        super().__init__()
        if reference_frames not in REFERENCE_FRAMES:
            raise ValueError(f"reference_frames must be one of {', '.join(REFERENCE_FRAMES)}, "
                             f"got '{reference_frames}'")
        self.num_classes = num_classes
        self.reference_frames = reference_frames

    # -- the two halves -------------------------------------------------------------------
    def frame_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised RGB -> B x C x ceil32(H)/s x ceil32(W)/s (s = feature_stride)."""
        return self.encode(images)[0]

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """frame features plus auxiliary feature maps (for auxiliary training losses)."""
        _check_rank(images, 4, "B x 3 x H x W")
        return self._encode(self.pad(images))

    def temporal_head(self, current: torch.Tensor, past: Sequence[torch.Tensor],
                      out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits B x classes x H x W: upsampled by feature_stride, cropped to out_size."""
        if len(past) != len(self.temporal_offsets):
            raise ValueError(f"temporal_head expects {len(self.temporal_offsets)} past features "
                             f"(offsets {self.temporal_offsets}), got {len(past)}")
        logits = self._head(current, list(past))
        return self.upsample(logits, out_size)

    # -- what each variant implements ---------------------------------------------------------
    def _encode(self, padded: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        raise NotImplementedError

    def _head(self, current: torch.Tensor, past: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def aux_logits(self, aux_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Logits of the auxiliary heads (at their own scale); none by default."""
        return []

    def backbone_parameters(self) -> List[nn.Parameter]:
        """The pretrained backbone's parameters (the VSPW baseline's "encoder")."""
        raise NotImplementedError

    def context_parameters(self) -> List[nn.Parameter]:
        """What the paper's stage 2 calls "the context path" (its own learning rate)."""
        return self.backbone_parameters()

    # -- the whole clip -------------------------------------------------------------------------
    def forward(self, clip: torch.Tensor, aux: bool = False, past_grad: bool = True):
        """clip B x T x 3 x H x W, the last frame is t -> logits B x K x H x W.

        clip[:, -2 - i] is the reference at temporal_offsets[i]: [t-9, t-6, t-3, t] (oldest
        first) for "past" models, [t+9, t+6, t+3, t] for "future" ones.

        T is len(temporal_offsets) + 1 (image models take any T and use the last frame).
        aux=True returns (logits, [aux logits at input size]) for BiSeNet's auxiliary losses.
        past_grad=False runs the past frames without autograd: their activations are not kept,
        which saves roughly three quarters of the backbone's activation memory in training.
        """
        _check_rank(clip, 5, "B x T x 3 x H x W (T frames, t last)")
        n_past = len(self.temporal_offsets)
        b, t, c, h, w = clip.shape
        if c != 3 or t < n_past + 1 or (n_past and t != n_past + 1):
            raise ValueError(f"expected a clip shaped B x {n_past + 1} x 3 x H x W, got "
                             f"{tuple(clip.shape)}")
        if n_past == 0:
            current, aux_feats = self.encode(clip[:, -1])
            past = []
        elif past_grad:
            feats, aux_all = self.encode(clip.flatten(0, 1))
            feats = feats.unflatten(0, (b, t))
            current = feats[:, -1]
            # clip[:, -2] is t - offsets[0], clip[:, -3] is t - offsets[1], ...
            past = [feats[:, t - 2 - i] for i in range(n_past)]
            aux_feats = [a.unflatten(0, (b, t))[:, -1] for a in aux_all]
        else:
            current, aux_feats = self.encode(clip[:, -1])
            with torch.no_grad():
                past_feats = self.frame_features(clip[:, :-1].flatten(0, 1)).unflatten(0, (b, t - 1))
            past = [past_feats[:, t - 2 - i] for i in range(n_past)]
        logits = self.temporal_head(current, past, out_size=(h, w))
        if not aux:
            return logits
        return logits, [self.upsample(a, (h, w)) for a in self.aux_logits(aux_feats)]

    # -- helpers --------------------------------------------------------------------------------
    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to a multiple of size_divisor (zero = the mean colour)."""
        h, w = images.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        return F.pad(images, (0, pw, 0, ph)) if (ph or pw) else images

    def upsample(self, logits: torch.Tensor,
                 out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Bilinear upsample to the padded input size, then crop the padding off.

        Without out_size the logits are upsampled by feature_stride (the padded size).
        """
        h, w = logits.shape[-2:]
        s = self.feature_stride
        if out_size is None:
            out_size = (h * s, w * s)
        ph = -(-out_size[0] // self.size_divisor) * self.size_divisor
        pw = -(-out_size[1] // self.size_divisor) * self.size_divisor
        up = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)
        return up[..., :out_size[0], :out_size[1]]


def _check_rank(x: torch.Tensor, rank: int, expected: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != rank:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an input shaped {expected}, got {got}")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a random-init model random BatchNorm statistics and affine parameters.

    Fresh BatchNorm layers hold mean 0, var 1, weight 1, bias 0: in eval mode they are the
    identity, the activations of a random network shrink or blow up layer by layer, and the
    argmax becomes nearly constant. Random statistics make the outputs varied, as after training,
    for tests and benchmarks that run without a trained checkpoint. Returns the model.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model

