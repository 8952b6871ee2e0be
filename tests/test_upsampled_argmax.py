"""The temporal graph's labels: upsampled_argmax against upsample-all-classes-then-argmax."""

import pytest
import torch
import torch.nn.functional as F

from tbn_export.onnx_export import upsampled_argmax


def _reference(logits, out_size, stride):
    h, w = logits.shape[-2:]
    up = F.interpolate(logits, size=(h * stride, w * stride), mode="bilinear",
                       align_corners=False)
    return up[..., :out_size[0], :out_size[1]].argmax(1)


@pytest.mark.parametrize("h,w,out,stride", [
    (8, 12, (64, 96), 8),    # the export's case: padded size, nothing cropped
    (8, 12, (61, 90), 8),    # cropped back from the padding
    (5, 7, (15, 21), 3),     # odd stride: the cells start at another offset
    (6, 6, (24, 24), 4),
    (3, 4, (48, 64), 16),
])
def test_exact_with_every_class_a_candidate(h, w, out, stride):
    """With all classes as candidates the cell-wise interpolation is the bilinear upsample
    itself: labels equal pixel for pixel (catches a wrong cell offset, fraction or crop)."""
    g = torch.Generator().manual_seed(h * w + stride)
    logits = torch.randn(2, 19, h, w, generator=g)
    labels = upsampled_argmax(logits, out, stride, candidates=19)
    assert labels.shape == (2, *out)
    assert torch.equal(labels, _reference(logits, out, stride))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_candidates_on_segmentation_like_logits(seed):
    """Logits shaped like a segmentation head's (a few regions with smooth borders, every one
    of the 124 classes noisy): the default 8 candidates give the same labels on >= 99.9% of
    pixels (the temporal graph's bound); 1 candidate (the corners' best class only) is clearly
    worse, so the bound has teeth."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 124, (5,), generator=g)
    regions = classes[torch.randint(0, 5, (4, 6), generator=g)]
    onehot = F.one_hot(regions, 124).permute(2, 0, 1)[None].float()
    logits = 8 * F.interpolate(onehot, size=(16, 24), mode="bilinear", align_corners=False)
    logits = logits + torch.randn(logits.shape, generator=g)
    ref = _reference(logits, (128, 192), 8)
    agree = (upsampled_argmax(logits, (128, 192), 8) == ref).float().mean().item()
    assert agree >= 0.999, agree
    worse = (upsampled_argmax(logits, (128, 192), 8, candidates=1) == ref).float().mean().item()
    assert worse < 0.98
