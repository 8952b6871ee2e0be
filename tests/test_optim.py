"""optim.py: which parameters get which lr and weight decay, in both stages; the schedule."""

import pytest
import torch

from tbn_train.config import make_config
from tbn_train.models import build_model
from tbn_train.optim import build_optimizer, lr_factor, param_groups


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tbn_tiny", num_classes=5)


def _cfg(**kw):
    return make_config("demo", overrides=kw)


def _group_of(model, groups):
    """parameter name -> its group's (name, lr, weight_decay)."""
    by_id = {id(p): (g["name"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_every_parameter_in_exactly_one_group(tiny):
    for stage in (1, 2):
        groups = param_groups(tiny, _cfg(), stage)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))


def test_swin_recipe_exempts_norms_biases_and_position_tables(tiny):
    of = _group_of(tiny, param_groups(tiny, _cfg(weight_decay=5e-4, no_decay="norm_bias_pos"), 1))
    exempt = [n for n, (_, _, wd) in of.items() if wd == 0]
    decayed = [n for n, (_, _, wd) in of.items() if wd == 5e-4]
    assert len(exempt) + len(decayed) == len(of)
    assert set(exempt) == {n for n, p in tiny.named_parameters()  # norms and biases are 1-D
                           if p.ndim <= 1 or "relative_position_bias_table" in n}
    assert any("relative_position_bias_table" in n for n in exempt)
    assert any(n.endswith("norms.0.weight") for n in exempt)  # the stage LayerNorms
    assert all(n.endswith(".weight") for n in decayed)
    assert "context_path.arm16.conv.0.weight" in decayed and "ffm.fc1.weight" in decayed


def test_baseline_recipe_decays_everything_but_biases():
    model = build_model("stppm_tiny", num_classes=5)
    of = _group_of(model, param_groups(model, _cfg(weight_decay=1e-4, no_decay="bias",
                                                   backbone_lr_mult=0.1, lr=0.01), 1))
    for n, (group, lr, wd) in of.items():
        assert wd == (0.0 if n.endswith(".bias") else 1e-4), n
        # the encoder at 0.1 x the lr, the PPM head and deep supervision at the lr
        assert lr == pytest.approx(0.001 if n.startswith("backbone.") else 0.01), n
        assert group.startswith("backbone" if n.startswith("backbone.") else "head")
    assert of["backbone.norms.0.weight"][2] == 1e-4  # the baseline decays norm weights


def test_stage_2_context_path_lr(tiny):
    of = _group_of(tiny, param_groups(tiny, _cfg(stage2_lr_context=2e-4, stage2_lr_rest=5e-4), 2))
    for n, (_, lr, _) in of.items():
        assert lr == (2e-4 if n.startswith("context_path.") else 5e-4), n
    assert of["context_path.arm32.conv_atten.weight"][1] == 2e-4  # an ARM is context path
    assert of["ffm.conv.0.weight"][1] == 5e-4


def test_one_step_decays_only_the_decayed():
    model = build_model("bisenet_tiny", num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, _cfg(lr=0.1, weight_decay=0.5, momentum=0.0), 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (p.ndim > 1 and "relative_position_bias_table" not in n
                           and before[n].abs().sum() > 0), n
    assert opt.param_groups[-1]["lr"] == 0.1  # train.py logs the last group's lr


def test_unknown_no_decay_rule(tiny):
    with pytest.raises(ValueError, match="no_decay must be one of"):
        param_groups(tiny, _cfg(no_decay="norms"), 1)


def test_poly_schedule_with_warmup():
    cfg = _cfg(poly_power=0.9, warmup_iters=10, warmup_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx((1 - 0.05) ** 0.9 * 0.55)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, cfg) == 0.0 and lr_factor(120, 100, cfg) == 0.0
