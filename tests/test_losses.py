"""OHEM keeps exactly the pixels it should; CE ignores 255; the aux total."""

import math

import torch
import torch.nn.functional as F

from tbn_train.losses import (cross_entropy, make_criterion, ohem_cross_entropy, ohem_keep_mask,
                              total_loss)

# true-class probabilities of 8 pixels (2 classes); pixel 6 is labelled 255 and is the hardest.
PROBS = [0.9, 0.5, 0.2, 0.95, 0.6, 0.8, 0.05, 0.3]
TARGET = [0, 1, 0, 1, 0, 1, 255, 0]


def _case():
    logits = torch.zeros(1, 2, 1, len(PROBS))
    target = torch.tensor(TARGET).view(1, 1, -1)
    for i, (p, t) in enumerate(zip(PROBS, TARGET)):
        cls = 0 if t == 255 else t
        logits[0, cls, 0, i] = math.log(p)
        logits[0, 1 - cls, 0, i] = math.log(1 - p)
    return logits, target


def _kept(mask):
    return torch.nonzero(mask.flatten()).flatten().tolist()


def test_probabilities_of_the_hand_made_case():
    logits, target = _case()
    prob = torch.softmax(logits, 1)[0, :, 0]
    for i, (p, t) in enumerate(zip(PROBS, TARGET)):
        assert abs(prob[0 if t == 255 else t, i].item() - p) < 1e-6


def test_ohem_keeps_pixels_under_threshold():
    logits, target = _case()
    # under 0.7: pixels 1 (0.5), 2 (0.2), 4 (0.6), 7 (0.3); 6 is ignored although hardest
    assert _kept(ohem_keep_mask(logits, target, thresh=0.7, min_kept=2)) == [1, 2, 4, 7]
    assert _kept(ohem_keep_mask(logits, target, thresh=0.7, min_kept=4)) == [1, 2, 4, 7]


def test_ohem_min_kept_takes_the_hardest():
    logits, target = _case()
    # 6 needed: the 4 above plus the next hardest labelled pixels 5 (0.8) and 0 (0.9)
    assert _kept(ohem_keep_mask(logits, target, thresh=0.7, min_kept=6)) == [0, 1, 2, 4, 5, 7]
    assert _kept(ohem_keep_mask(logits, target, thresh=0.1, min_kept=1)) == [2]
    # more than the labelled pixels: all labelled pixels, never the ignored one
    assert _kept(ohem_keep_mask(logits, target, thresh=0.1, min_kept=100)) == [0, 1, 2, 3, 4, 5, 7]


def test_ohem_loss_is_the_mean_ce_of_kept_pixels():
    logits, target = _case()
    kept = [1, 2, 4, 7]
    expected = sum(-math.log(PROBS[i]) for i in kept) / len(kept)
    assert abs(ohem_cross_entropy(logits, target, 0.7, 2).item() - expected) < 1e-5


def test_ce_ignores_255_and_zero_without_labels():
    logits, target = _case()
    valid = [i for i, t in enumerate(TARGET) if t != 255]
    expected = sum(-math.log(PROBS[i]) for i in valid) / len(valid)
    assert abs(cross_entropy(logits, target).item() - expected) < 1e-5
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().sum() == 0


def test_total_loss_adds_weighted_aux():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 5, 4, 4), [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)]
    target = torch.randint(0, 5, (2, 4, 4))
    out = total_loss(make_criterion("ce"), logits, aux, target, aux_weight=0.4)
    want = F.cross_entropy(logits, target) + 0.4 * sum(F.cross_entropy(a, target) for a in aux)
    assert torch.allclose(out["loss"], want)


def test_ohem_min_kept_counts_per_image():
    logits, target = _case()
    # image 0: the hand-made case; image 1: every pixel easy (p = 0.99 for its label)
    easy = torch.zeros_like(logits)
    easy[0, 0], easy[0, 1] = math.log(0.99), math.log(0.01)
    two_logits = torch.cat([logits, easy])
    two_target = torch.cat([target, torch.zeros_like(target)])
    keep = ohem_keep_mask(two_logits, two_target, thresh=0.7, min_kept=3)
    # image 0 has 4 pixels under 0.7 (enough); image 1 none, so it keeps 3 of its own pixels
    assert _kept(keep[0]) == [1, 2, 4, 7]
    assert int(keep[1].sum()) == 3
    # the same image alone or in a batch keeps the same pixels
    alone = ohem_keep_mask(logits, target, thresh=0.7, min_kept=6)
    assert torch.equal(ohem_keep_mask(two_logits, two_target, 0.7, 6)[0], alone[0])
