"""The model family: shapes, the frame/temporal split, gradients, registry, pretrained loading."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from tbn_train.models import BackboneError, build_model, list_models, randomize_batchnorm


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_batchnorm(build_model("tbn_tiny", num_classes=11)).eval()


@pytest.mark.parametrize("size", [(480, 480), (480, 853), (479, 479), (240, 320)])
def test_output_shapes_any_size(tiny, size):
    h, w = size
    clip = torch.randn(1, 4, 3, h, w)
    with torch.no_grad():
        logits = tiny(clip)
        feats = tiny.frame_features(clip[:, -1])
    assert logits.shape == (1, 11, h, w)
    # stride 8 of the input padded to a multiple of 32
    assert feats.shape == (1, tiny.feature_chs, -(-h // 32) * 4, -(-w // 32) * 4)


def test_temporal_offsets_attribute():
    assert build_model("tbn_tiny").temporal_offsets == (3, 6, 9)
    assert build_model("bisenet_tiny").temporal_offsets == ()
    assert build_model("tbn_tiny", temporal_offsets=(2, 4)).temporal_offsets == (2, 4)


def test_forward_equals_split(tiny):
    torch.manual_seed(1)
    clip = torch.randn(2, 4, 3, 96, 128)
    with torch.no_grad():
        whole = tiny(clip)
        f = [tiny.frame_features(clip[:, i]) for i in range(4)]  # t-9, t-6, t-3, t
        split = tiny.temporal_head(f[3], [f[2], f[1], f[0]], out_size=(96, 128))
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-4)


def test_temporal_head_order_free_but_uses_past(tiny):
    torch.manual_seed(2)
    cur, a, b, c = (torch.randn(1, tiny.feature_chs, 8, 12) for _ in range(4))
    with torch.no_grad():
        ref = tiny.temporal_head(cur, [a, b, c])
        permuted = tiny.temporal_head(cur, [c, a, b])
        other = tiny.temporal_head(cur, [a, b, torch.randn_like(c)])
    torch.testing.assert_close(ref, permuted, rtol=1e-5, atol=1e-5)
    assert (ref - other).abs().max() > 1e-3


def test_bilateral_ignores_past():
    model = randomize_batchnorm(build_model("bisenet_tiny", num_classes=5)).eval()
    torch.manual_seed(3)
    clip = torch.randn(1, 4, 3, 64, 96)
    other = clip.clone()
    other[:, :3] = torch.randn_like(other[:, :3])
    with torch.no_grad():
        torch.testing.assert_close(model(clip), model(other))
        cur = model.frame_features(clip[:, -1])
        torch.testing.assert_close(model(clip), model.temporal_head(cur, [], out_size=(64, 96)))
    with pytest.raises(ValueError, match="expects 0 past features"):
        model.temporal_head(cur, [cur, cur, cur])


def test_stppm_split_and_past():
    model = randomize_batchnorm(build_model("stppm_tiny", num_classes=7)).eval()
    torch.manual_seed(4)
    clip = torch.randn(1, 4, 3, 96, 96)
    with torch.no_grad():
        f = [model.frame_features(clip[:, i]) for i in range(4)]
        torch.testing.assert_close(model(clip), model.temporal_head(f[3], f[2::-1], (96, 96)),
                                   rtol=1e-4, atol=1e-4)
        changed = model.temporal_head(f[3], [f[2], f[1], torch.randn_like(f[0])], (96, 96))
    assert model(clip).shape == (1, 7, 96, 96)
    assert (changed - model(clip)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tbn_tiny", "bisenet_tiny", "stppm_tiny"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(5)
    model = build_model(name, num_classes=6).train()
    clip = torch.randn(2, 4, 3, 64, 64)
    target = torch.randint(0, 6, (2, 64, 64))
    logits, aux = model(clip, aux=True)
    loss = sum(torch.nn.functional.cross_entropy(x, target) for x in [logits, *aux])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def _train_pass(model, clip, past_grad):
    """Logits, input gradient and parameter gradients of one training-mode pass."""
    model.zero_grad()
    x = clip.clone().requires_grad_(True)
    logits = model(x, past_grad=past_grad)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), x.grad, grads


def test_past_grad_switch_in_training():
    """--no-past-grad (training mode, where it is used): the same function of the clip, but
    gradients reach the past frames only with past_grad."""
    torch.manual_seed(6)
    model = randomize_batchnorm(build_model("tbn_tiny", num_classes=4)).train()
    clip = torch.randn(2, 4, 3, 64, 64)
    # Full training mode: BatchNorm normalises with the batch's statistics, and past_grad puts
    # 4 frames per clip into one batch where --no-past-grad puts 1 (then 3), so they differ.
    on, off = (model(clip, past_grad=g).detach() for g in (True, False))
    assert (on - off).abs().max() > 1e-3
    # With BatchNorm on its running statistics and no stochastic depth, each frame's path is
    # the same function in both modes: the logits must agree.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
        if isinstance(m, timm.layers.DropPath):
            m.drop_prob = 0.0
    (on, x_on, p_on), (off, x_off, p_off) = (_train_pass(model, clip, g) for g in (True, False))
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)
    # what differs: the gradient reaches every past frame of every clip only with past_grad
    assert (x_on[:, :-1].flatten(2).abs().sum(-1) > 0).all()
    assert (x_off[:, :-1] == 0).all()
    assert (x_on[:, -1].flatten(1).abs().sum(-1) > 0).all()
    assert (x_off[:, -1].flatten(1).abs().sum(-1) > 0).all()
    # every parameter still learns; the backbone's gradient lacks the past frames' share
    assert p_on.keys() == p_off.keys() and len(p_on) > 0
    context = {id(p) for p in model.context_parameters()}
    backbone = [n for n, p in model.named_parameters() if id(p) in context and n in p_on]
    assert backbone and all(not torch.allclose(p_on[n], p_off[n]) for n in backbone[:4])


def test_swin_l_parameter_count():
    model = build_model("tbn_swin_l")
    backbone = sum(p.numel() for p in model.backbone_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"tbn_swin_l: {total / 1e6:.2f} M parameters, Swin-L features {backbone / 1e6:.2f} M")
    assert abs(backbone / 1e6 - 195.2) < 0.1
    # BiSeNet heads on top: ARMs, context convs, spatial path, FFM, classifier, aux heads
    assert 4e6 < total - backbone < 6e6
    # mmseg's Swin: stage 4 (12 x 12 at timm's 384, 15 x 15 at 480) shifts its windows too
    assert model.context_path.backbone.model.layers[3].blocks[1].shift_size == (6, 6)


def test_context_path_is_backbone_arms_and_merging_convs(tiny):
    context = {id(p) for p in tiny.context_parameters()}
    backbone = {id(p) for p in tiny.backbone_parameters()}
    assert backbone < context
    for name in ("arm16", "arm32", "conv_avg", "head32", "head16"):
        assert all(id(p) in context for p in getattr(tiny.context_path, name).parameters()), name
    for part in (tiny.spatial_path, tiny.ffm, tiny.classifier, tiny.aux16, tiny.aux32):
        assert not any(id(p) in context for p in part.parameters())


def test_swin_stages_shift_and_are_normalised():
    # Swin-T's stage 4 is 7 x 7 at timm's 224 = one window: timm alone would never shift it
    swin_t = build_model("bisenet_swin_t").context_path.backbone.model
    assert all(any(b.shift_size) for layer in swin_t.layers for b in layer.blocks[1::2])
    # each stage read is LayerNormed over its channels (fresh norms: weight 1, bias 0)
    backbone = build_model("tbn_tiny").context_path.backbone
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 96))
    assert len(feats) == 2
    for f in feats:
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f[:, 0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.var(1, unbiased=False), torch.ones_like(f[:, 0]),
                                   atol=1e-2, rtol=0)


def test_stppm_pyramid_normalises_before_upsampling():
    model = randomize_batchnorm(build_model("stppm_tiny", num_classes=5)).eval()
    torch.manual_seed(8)
    frames = [torch.randn(1, model.feature_chs, 6, 8) for _ in range(4)]
    branch = model.branches[1]  # scale 2
    F = torch.nn.functional
    with torch.no_grad():
        pooled = torch.stack([F.adaptive_avg_pool2d(f, 2) for f in frames]).mean(0)
        want = F.interpolate(branch.conv(pooled), size=(6, 8), mode="bilinear",
                             align_corners=False)  # conv-BN-ReLU, then upsample
        torch.testing.assert_close(branch(frames, (6, 8)), want)


def test_stppm_one_clip_batchnorm_is_refused_clearly():
    model = build_model("stppm_tiny", num_classes=5).train()
    with pytest.raises(ValueError, match="--batch-size 2"):
        model(torch.randn(1, 4, 3, 64, 64))
    logits, aux = model(torch.randn(2, 4, 3, 64, 64), aux=True)  # two clips train
    assert len(aux) == 1 and aux[0].shape == logits.shape  # deep supervision on stage 3
    assert build_model("stppm_tiny", aux_heads=False).deepsup is None


def test_stppm_r101_is_the_baselines_encoder():
    model = build_model("stppm_r101")
    resnet = model.backbone.model
    stem = [m for m in resnet.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in stem] == \
        [(3, 64, (3, 3)), (64, 64, (3, 3)), (64, 128, (3, 3))]  # CSAIL's deep stem
    assert resnet.layer3[1].conv2.dilation == (2, 2) and resnet.layer4[1].conv2.dilation == (4, 4)
    assert model.feature_stride == 8 and model.deepsup[0][0].in_channels == 1024


def test_reference_frames_travel_with_the_checkpoint(tmp_path):
    from tbn_train.checkpoint import load_model, save_checkpoint
    model = build_model("stppm_tiny", num_classes=5, reference_frames="future")
    save_checkpoint(str(tmp_path / "m.safetensors"), model)
    assert load_model(str(tmp_path / "m.safetensors"))[0].reference_frames == "future"
    assert build_model("tbn_tiny").reference_frames == "past"
    with pytest.raises(ValueError, match="past, future"):
        build_model("tbn_tiny", reference_frames="later")


def test_unknown_model_lists_known():
    with pytest.raises(ValueError) as e:
        build_model("tbn_swin_xxl")
    for name in list_models():
        assert name in str(e.value)


def test_wrong_rank_says_expected_shape(tiny):
    with pytest.raises(ValueError, match=r"B x T x 3 x H x W"):
        tiny(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"B x 3 x H x W"):
        tiny.frame_features(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"B x 4 x 3 x H x W"):
        tiny(torch.randn(1, 2, 3, 64, 64))


_TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=7)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_pretrained_from_local_file(tmp_path, fmt):
    torch.manual_seed(7)
    source = timm.create_model("swin_tiny_patch4_window7_224", **_TINY_SWIN)
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:  # a timm-style training checkpoint
        torch.save({"state_dict": source.state_dict()}, path)
    model = build_model("tbn_tiny", pretrained=str(path))
    loaded = model.context_path.backbone.model.state_dict()
    ref = source.state_dict()
    assert len(loaded) > 10
    for k, v in loaded.items():
        torch.testing.assert_close(v, ref[k], msg=k)


def test_pretrained_csail_resnet_file(tmp_path):
    """A CSAIL-layout deep-stem ResNet checkpoint (the VSPW baseline's encoder weights) loads
    into timm's deep stem; a tiny resnet101s stands in for resnet101-imagenet.pth."""
    from tbn_train.models import TimmBackbone
    from tbn_train.models.backbones import csail_resnet_filter
    arch = dict(layers=(1, 1, 1, 1), stem_width=16)
    torch.manual_seed(9)
    source = timm.create_model("resnet101s", **arch)
    csail_names = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.",
                   "conv1.4.": "bn2.", "conv1.6.": "conv3.", "bn1.": "bn3."}
    csail = {}
    for key, value in source.state_dict().items():
        for timm_name, csail_name in csail_names.items():
            if key.startswith(timm_name):
                key = csail_name + key[len(timm_name):]
                break
        csail[key] = value
    assert "conv3.weight" in csail and "bn3.running_var" in csail
    torch.save(csail, tmp_path / "resnet-imagenet.pth")
    backbone = TimmBackbone("resnet101s", (3, 4), str(tmp_path / "resnet-imagenet.pth"),
                            output_stride=8, pretrained_filter_fn=csail_resnet_filter, **arch)
    loaded = backbone.model.state_dict()
    ref = source.state_dict()
    assert len(loaded) > 20
    for k, v in loaded.items():
        torch.testing.assert_close(v, ref[k], msg=k)


def test_pretrained_missing_file_is_clear(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        build_model("tbn_tiny", pretrained=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    with pytest.raises(BackboneError, match="does not fit"):
        build_model("tbn_tiny", pretrained=str(bad))
