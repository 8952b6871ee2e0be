"""A corpus across Ray (tbn_runtime.cluster): chunks give the single run's masks, bad seeks are
caught and redone, resume keeps complete chunks; on a local Ray (2 CPUs, loopback only, started
and stopped here): `tbn-run --ray` equals one process, and a killed worker's chunk is redone."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import cv2
import pytest

from runtime_helpers import NO_TORCH, get_export, synthetic_frames, write_video
from tbn_runtime import sources
from tbn_runtime.cli import build_parser
from tbn_runtime.cli import main as tbn_run_main
from tbn_runtime.cluster import (DEFAULT_CHUNK_FRAMES, DEFAULT_CPUS_PER_WORKER, Chunk, ChunkWorker,
                                 join_coco, plan_video, read_marker, run_chunk, run_corpus,
                                 seek_mismatches)
from tbn_runtime.files import sha256_file
from tbn_runtime.segmenter import Segmenter
from tbn_runtime.sources import Video, open_source

H, W = 48, 64


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return get_export(tmp_path_factory)


@pytest.fixture(scope="module")
def seg(export_dir):
    with Segmenter(export_dir, backend="ort", device="cpu") as s:
        yield s


@pytest.fixture(scope="module")
def model(export_dir):
    return sha256_file(os.path.join(export_dir, "manifest.json"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of three videos (25, 6 and 13 frames: two of them chunked at 10)."""
    d = tmp_path_factory.mktemp("corpus")
    write_video(str(d / "a.mp4"), synthetic_frames(25, H, W, seed=1))
    write_video(str(d / "b.avi"), synthetic_frames(6, H, W, seed=2), fourcc="MJPG")
    write_video(str(d / "c.mp4"), synthetic_frames(13, H, W, seed=3))
    return str(d)


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames") / "vid"
    d.mkdir()
    for i, f in enumerate(synthetic_frames(17, H, W, seed=4)):
        cv2.imwrite(str(d / f"frame_{i}.png"), f)          # natural order: frame_2 < frame_10
    return str(d)


def _one_process(export_dir, source, out, *extra):
    """Masks of one tbn-run process (in this process), to compare with."""
    assert tbn_run_main([source, "--out", str(out), "--model", export_dir, "--backend", "ort",
                         "--device", "cpu", "--no-progress", *extra]) == 0
    return str(out)


def _files(root):
    """Every output file under root, relative path -> bytes (the hidden state left out)."""
    got = {}
    for d, dirs, fs in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in fs:
            if not f.startswith("."):
                p = os.path.join(d, f)
                got[os.path.relpath(p, root)] = open(p, "rb").read()
    return got


def _run_all(seg, chunks, out, fmt, model):
    return {c: run_chunk(seg, c, str(out), fmt, model) for c in chunks}


# -- without Ray ---------------------------------------------------------------------------------
def test_plan_video(corpus):
    video = next(v for v in open_source(corpus) if v.name == "a")   # lazy: count unknown yet
    chunks = plan_video(video, 10, history=9)
    assert [(c.start, c.end, c.lead, c.tail, c.size) for c in chunks] == [
        (0, 10, 0, 9, 10), (10, 20, 9, 9, 10), (20, None, 9, 0, 5)]
    assert [c.lead for c in plan_video(video, 4, history=9)] == [0, 4, 8, 9, 9, 9, 9]
    # image-only models still overlap by one frame, for the seek check
    assert [(c.lead, c.tail) for c in plan_video(video, 10, history=1)] == [(0, 1), (1, 1),
                                                                            (1, 0)]
    assert len(plan_video(video, 0, history=9)) == 1 and len(plan_video(video, 25, 9)) == 1
    with pytest.raises(sources.SourceError, match="without --ray"):
        plan_video(Video("cam", "camera", "0"), 10, history=9)
    assert DEFAULT_CHUNK_FRAMES == build_parser().get_default("chunk_frames")
    help_text = build_parser().format_help()
    assert f"(0: {DEFAULT_CPUS_PER_WORKER}, or all" in " ".join(help_text.split())


def test_chunks_equal_single_run(export_dir, seg, model, corpus, frame_folder, tmp_path):
    """Chunks of a video file (seeking) and of a frame folder, run one by one, write the
    single run's masks byte for byte; without the lead frames they would not."""
    ref = _one_process(export_dir, os.path.join(corpus, "a.mp4"), tmp_path / "ref")
    _one_process(export_dir, frame_folder, tmp_path / "ref", "--overwrite")
    out = tmp_path / "chunked"
    for src in (os.path.join(corpus, "a.mp4"), frame_folder):
        chunks = plan_video(open_source(src)[0], 7, history=9)
        assert len(chunks) >= 3
        markers = _run_all(seg, chunks, out, "png", model)
        assert not seek_mismatches(list(markers.values()))
        assert all(read_marker(str(out), c, "png", model) for c in chunks)
    assert _files(out) == _files(ref) and len(_files(ref)) == 25 + 17
    assert "vid/frame_16.png" in _files(out)

    # the test can fail: a chunk that skips its lead frames gives other masks
    c = plan_video(open_source(os.path.join(corpus, "a.mp4"))[0], 7, history=9)[2]
    run_chunk(seg, Chunk(c.video, c.kind, c.origin, c.start, c.end), str(tmp_path / "nolead"),
              "png", model)
    got = _files(tmp_path / "nolead")
    assert any(got[k] != _files(ref)[k] for k in got)


def test_coco_parts_join_to_single_run(export_dir, seg, model, corpus, tmp_path):
    src = os.path.join(corpus, "a.mp4")
    ref = _one_process(export_dir, src, tmp_path / "ref", "--format", "coco-rle")
    chunks = plan_video(open_source(src)[0], 10, history=9)
    _run_all(seg, chunks, tmp_path / "out", "coco-rle", model)
    assert all(read_marker(str(tmp_path / "out"), c, "coco-rle", model) for c in chunks)
    join_coco(str(tmp_path / "out"), chunks)
    assert _files(tmp_path / "out") == _files(ref)          # the same bytes: ids renumbered
    assert not os.path.exists(tmp_path / "out" / ".tbn-cluster" / "a" / "00000010.coco")


def test_seek_off_by_one_is_caught_and_redone(export_dir, model, corpus, tmp_path,
                                              monkeypatch):
    """A codec whose seek lands one frame late: the middle chunk's border disagrees and the last
    chunk runs out of frames (the worker decodes it again from frame 0); the seeked chunks
    decoded from frame 0 agree and give the single run's masks."""
    src = os.path.join(corpus, "a.mp4")
    ref = _one_process(export_dir, src, tmp_path / "ref")
    chunks = plan_video(open_source(src)[0], 10, history=9)
    real_seek = sources._seek
    monkeypatch.setattr(sources, "_seek", lambda cap, i: real_seek(cap, i + 1))
    worker = ChunkWorker(export_dir, "ort", "cpu", str(tmp_path / "out"), "png", model)
    assert worker.ready()["error"] is None
    markers = {c: worker.run(c) for c in chunks}
    assert [m["read"] for m in markers.values()] == ["seek", "seek", "decoded from frame 0"]
    assert seek_mismatches(list(markers.values()))
    assert _files(tmp_path / "out") != _files(ref)
    markers[chunks[1]] = worker.run(dataclasses.replace(chunks[1], exact=True))
    assert not seek_mismatches(list(markers.values()))
    assert _files(tmp_path / "out") == _files(ref)
    worker.seg.close()


def test_markers_are_for_one_plan_model_and_format(seg, model, corpus, tmp_path):
    src = os.path.join(corpus, "b.avi")
    [c] = plan_video(open_source(src)[0], 10, history=9)
    out = str(tmp_path)
    assert read_marker(out, c, "png", model) is None
    run_chunk(seg, c, out, "png", model)
    assert read_marker(out, c, "png", model)["frames"] == 6
    assert read_marker(out, c, "png", "another model") is None
    assert read_marker(out, c, "npy", model) is None
    planned_longer = Chunk(c.video, c.kind, c.origin, 0, 5)
    assert read_marker(out, planned_longer, "png", model) is None
    with open(os.path.join(out, ".tbn-cluster", "b", "00000000.json"), "w") as f:
        f.write('{"start": 0, "mod')                        # cut short: not complete
    assert read_marker(out, c, "png", model) is None


def test_users_mistakes_are_one_line(export_dir, corpus, tmp_path, capsys):
    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copy(os.path.join(corpus, "a.mp4"), twins / "x.mp4")
    shutil.copy(os.path.join(corpus, "b.avi"), twins / "x.avi")
    with pytest.raises(sources.SourceError, match="would both write x/"):
        run_corpus(str(twins), str(tmp_path / "o"), export=export_dir, chunk_frames=10)
    for argv, needle in ((["--workers", "2"], "--workers goes with --ray"),
                         (["--ray", "--max-frames", "3"], "--max-frames is for one stream"),
                         (["--ray", "--chunk-frames", "-1"], "--chunk-frames must be at least 0")):
        assert tbn_run_main([os.path.join(corpus, "a.mp4"), *argv, "--out", str(tmp_path / "o"),
                             "--model", export_dir, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


# -- on a local Ray ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    """A Ray of 2 CPUs on loopback only, stopped at the end of the module."""
    # set before Ray is imported (it reads them once); the tbn-run subprocess inherits them
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's switch to bind 127.0.0.1 only
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray = pytest.importorskip("ray", reason="Ray is the optional extra tbn-vit[cluster]")
    ctx = ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   logging_level="ERROR")
    assert ctx.address_info["node_ip_address"] == "127.0.0.1"
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_cli_ray_equals_single_run_and_resumes(ray_address, export_dir, corpus, tmp_path):
    """Three videos (two chunked) and a broken one: the masks of the three equal one process's,
    the broken one is reported (exit 1) without stopping the others; --resume keeps complete
    chunks and does the missing one."""
    src = tmp_path / "videos"
    shutil.copytree(corpus, src)
    (src / "d.mp4").write_text("not a video\n")
    ref = tmp_path / "ref"
    assert tbn_run_main([str(src), "--out", str(ref), "--model", export_dir, "--backend", "ort",
                         "--device", "cpu", "--no-progress"]) == 1    # d.mp4 said, a-c done
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    cmd = [sys.executable, "-c", NO_TORCH, str(src), "--out", str(out), "--model", export_dir,
           "--backend", "ort", "--device", "cpu", "--no-progress", "--ray", ray_address,
           "--chunk-frames", "10", "--cpus-per-worker", "1", "--stats", str(stats)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    said = [ln for ln in r.stderr.splitlines() if "d.mp4" in ln]
    assert len(said) == 1 and "cannot open as a video" in said[0], r.stderr
    assert "44 frames of 3 videos" in r.stdout
    assert _files(out) == _files(ref) and len(_files(ref)) == 44
    s = json.load(open(stats))
    assert list(s["failed_videos"]) == ["d"] and len(s["workers"]) == 2
    rows = {row["video"]: row for row in s["table"]}
    assert {v: (row["frames"], row["chunks"]) for v, row in rows.items()} == {
        "a": (25, 3), "b": (6, 1), "c": (13, 2)}
    assert all(row["fps"] > 0 and row["node"] for row in rows.values())

    # resume: every chunk complete, no worker needed; then one marker gone, one chunk redone
    os.remove(src / "d.mp4")
    s = run_corpus(str(src), str(out), export=export_dir, backend="ort", device="cpu",
                   chunk_frames=10, cpus_per_worker=1, resume=True, progress=False)
    assert s["chunks_resumed"] == 6 and s["workers"] == [] and s["videos_resumed"] == 3
    os.remove(out / ".tbn-cluster" / "a" / "00000010.json")
    os.remove(out / "a" / "00000012.png")
    s = run_corpus(str(src), str(out), export=export_dir, backend="ort", device="cpu",
                   chunk_frames=10, workers=1, cpus_per_worker=1, resume=True, progress=False)
    assert s["chunks_resumed"] == 5 and s["frames"] - s["frames_resumed"] == 10
    assert s["failed_videos"] == {} and _files(out) == _files(ref)


def _children():
    """pid -> parent pid of every process."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def _my_chunk_workers():
    """The ChunkWorker processes of the Ray this test process started (its descendants)."""
    parents, mine, found = _children(), {os.getpid()}, []
    while True:
        more = {p for p, pp in parents.items() if pp in mine and p not in mine}
        if not more:
            break
        mine |= more
    for p in mine:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ChunkWorker"):
                    found.append(p)
        except OSError:
            pass
    return found


def test_killed_worker_chunk_is_redone(ray_address, export_dir, tmp_path):
    src = write_video(str(tmp_path / "long.mp4"), synthetic_frames(120, H, W, seed=6))
    ref = _one_process(export_dir, src, tmp_path / "ref")
    out = tmp_path / "out"
    result = {}

    def corpus_run():
        result["stats"] = run_corpus(src, str(out), export=export_dir, backend="ort",
                                     device="cpu", chunk_frames=40, workers=1,
                                     cpus_per_worker=1, progress=False)

    t = threading.Thread(target=corpus_run, daemon=True)
    t.start()
    killed = None
    for start in (0, 40, 80):            # kill the worker inside a chunk (the first, mostly)
        mask = out / "long" / f"{start + 3:08d}.png"
        deadline = time.monotonic() + 120
        while not mask.exists() and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.002)
        pids = _my_chunk_workers()
        assert len(pids) == 1, pids
        os.kill(pids[0], 9)
        if not (out / ".tbn-cluster" / "long" / f"{start:08d}.json").exists():
            killed = (start, pids[0])     # it died before finishing that chunk
            break
    assert killed is not None, "every chunk finished before the kill landed"
    t.join(timeout=240)
    assert not t.is_alive()
    s = result["stats"]
    assert s["failed_videos"] == {}
    with open(out / ".tbn-cluster" / "long" / f"{killed[0]:08d}.json") as f:
        assert json.load(f)["pid"] != killed[1]           # done again, by a new worker
    assert _files(out) == _files(ref)
