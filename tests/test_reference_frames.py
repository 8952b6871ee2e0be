"""Which frames a clip reads: past (streaming) or future (the VSPW baseline), reversal, image-only
clips; look-ahead evaluation of a future-frame model; a future-frame run end to end."""

import json

import numpy as np
import pytest
import torch

from tbn_runtime.preprocess import normalize_bgr
from tbn_train import evaluate, train
from tbn_train.checkpoint import load_model
from tbn_train.data.vspw import VSPWClips, read_frame, reference_indices
from tbn_train.models import build_model, randomize_batchnorm

from train_helpers import make_synth

OFFSETS = (3, 6, 9)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("refs") / "synth")  # 12-frame videos


def test_reference_indices():
    # past: t - k clamped to 0 (the streaming rule), references first, t last
    assert reference_indices(20, 40, OFFSETS) == [11, 14, 17, 20]
    assert reference_indices(4, 40, OFFSETS) == [0, 0, 1, 4]
    # future: t + k while t + 9 is in the video, then the past (the baseline's test code)
    assert reference_indices(20, 40, OFFSETS, "future") == [29, 26, 23, 20]
    assert reference_indices(30, 40, OFFSETS, "future") == [30 + 9, 36, 33, 30]
    assert reference_indices(31, 40, OFFSETS, "future") == [22, 25, 28, 31]
    # reversed in time: past reads the future and future the past
    assert reference_indices(4, 40, OFFSETS, "past", reverse=True) == [13, 10, 7, 4]
    assert reference_indices(20, 40, OFFSETS, "future", reverse=True) == [11, 14, 17, 20]
    assert reference_indices(4, 40, ()) == [4]


def _frames(ds, video, indices):
    return torch.from_numpy(np.stack([normalize_bgr(read_frame(ds.videos[video].frames[i]))
                                      for i in indices]))


def test_clips_read_the_models_references(synth_root):
    future = VSPWClips(synth_root, "train", reference="future", train=False)
    past = VSPWClips(synth_root, "train", train=False)
    assert future.frame_indices(0) == [9, 6, 3, 0] and past.frame_indices(0) == [0, 0, 0, 0]
    assert future.frame_indices(12 + 5) == [0, 0, 2, 5]  # video 1: no frame 14, so the past
    assert torch.equal(future[0][0], _frames(future, 0, [9, 6, 3, 0]))
    assert torch.equal(past[12 + 9][0], _frames(past, 1, [0, 3, 6, 9]))
    with pytest.raises(ValueError, match="temporal_reverse"):
        VSPWClips(synth_root, "train", reverse_prob=1.5)


def test_temporal_reversal_draws_per_item(synth_root):
    def clips(prob, seed, index=1):
        ds = VSPWClips(synth_root, "train", crop_size=(48, 48), scale_range=(0.75, 1.25),
                       reference="future", reverse_prob=prob)
        torch.manual_seed(seed)
        return ds[index][0]

    fwd = clips(0.0, 0)
    bwd = clips(1.0, 0)
    # same seed, same geometry: frame t is the same crop, the references differ
    assert torch.equal(fwd[-1], bwd[-1]) and not torch.equal(fwd[0], bwd[0])
    plain = VSPWClips(synth_root, "train", reference="future", train=False)
    assert plain.frame_indices(1, reverse=True) == [0, 0, 0, 1]  # frame 1 backwards: its past
    seen = set()
    for seed in range(10):  # a coin per item: both directions occur
        clip = clips(0.5, seed)
        same = [torch.equal(clip, c) for c in (clips(0.0, seed), clips(1.0, seed))]
        assert any(same), seed
        seen.add(same[1])
    assert seen == {False, True}


def test_image_only_clips_hold_one_frame(synth_root):
    clip, label = VSPWClips(synth_root, "train", offsets=(), crop_size=(32, 32))[5]
    assert clip.shape == (1, 3, 32, 32) and label.shape == (32, 32)


def test_lookahead_evaluation_equals_future_clips():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("stppm_tiny", num_classes=5,
                                            reference_frames="future")).eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8) for _ in range(12)]
    out = list(evaluate.predict_logits(model, iter(frames), "cpu"))
    assert len(out) == 12
    for t in range(12):  # frames 0..2 read t+3..t+9, frames 3..11 their past
        idx = reference_indices(t, 12, OFFSETS, "future")
        clip = torch.stack([torch.from_numpy(normalize_bgr(frames[i])) for i in idx])[None]
        with torch.no_grad():
            torch.testing.assert_close(out[t], model(clip), atol=1e-4, rtol=1e-4)
    model.reference_frames = "past"  # the same weights streamed: a different answer at t = 0
    assert not torch.allclose(next(evaluate.predict_logits(model, iter(frames), "cpu")), out[0])


def test_future_frame_preset_trains_and_evaluates(synth_root, tmp_path, monkeypatch):
    built = []
    real_init = VSPWClips.__init__

    def spy(self, *args, **kwargs):  # the training loader's clips follow the model
        real_init(self, *args, **kwargs)
        built.append((self.offsets, self.reference, self.reverse_prob))

    monkeypatch.setattr(VSPWClips, "__init__", spy)
    out = tmp_path / "run"
    rc = train.main(["--preset", "demo", "--data", str(synth_root), "--out", str(out),
                     "--set", "model=stppm_tiny",
                     "--set", "model_kwargs={reference_frames: future}",
                     "--temporal-reverse", "0.5", "--backbone-lr-mult", "0.1", "--no-decay",
                     "bias", "--crop-size", "64", "64", "--batch-size", "2", "--iters", "2",
                     "--workers", "0", "--device", "cpu"])
    assert rc == 0
    assert built == [(OFFSETS, "future", 0.5)]
    model, meta = load_model(str(out / "best.safetensors"))
    assert model.reference_frames == "future" and meta["config"]["temporal_reverse"] == 0.5
    state = torch.load(out / "stage1" / "last.state.pt", weights_only=True)
    lrs = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    evals = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("mIoU") is not None for r in evals)
