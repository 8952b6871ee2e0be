"""The driver of a corpus run: connect to Ray, start one ChunkWorker per GPU (or per N cores),
hand the chunks out through Ray's ActorPool, check the chunk borders, join coco-rle parts and
summarise. See tbn_runtime.cluster."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from ..console import first_line as _first_line
from ..console import progress_bar
from ..driver import check_names
from ..errors import TbnError
from ..files import sha256_file, sweep_stale
from ..manifest import MANIFEST_NAME, load_manifest
from ..outputs import MaskOutput
from ..segmenter import default_export
from ..sources import SourceError, Video, videos_of
from .chunks import (DEFAULT_CHUNK_FRAMES, STATE_DIR, Chunk, ChunkWorker, join_coco,
                     marker_path, plan_video, read_marker, seek_mismatches, state_dir)

log = logging.getLogger("tbn_runtime")

#: CPU cores per worker on nodes without a GPU (fewer where the largest node has fewer)
DEFAULT_CPUS_PER_WORKER = 4
#: how often Ray runs a chunk again after its worker died before the chunk counts as failed
DEFAULT_RETRIES = 3


class ClusterError(TbnError, RuntimeError):
    """Ray missing or unreachable, or no worker can start; one-line message."""


def _probe(address: str) -> None:
    """Fail at once when nothing listens at HOST:PORT (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except ValueError:
        raise ClusterError(f"--ray {address}: give the head's address as HOST:PORT") from None
    except OSError as e:
        raise ClusterError(f"nothing answers at {address} ({e.strerror or e}): start the head "
                           f"with `ray start --head` there, or check the address") from None


@contextmanager
def ray_session(address: Optional[str] = None, verbose: bool = False) -> Iterator[Any]:
    """The ray module, connected as ray.init(address) connects: HOST:PORT: that head node;
    None: $RAY_ADDRESS, else the cluster `ray start` began on this machine, else a Ray started
    here; "local": a Ray started here. A Ray started here stops when the session ends; one the
    caller has initialised already is used as it is and left up."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'tbn-vit[cluster]'") from None
    if ray.is_initialized():
        yield ray
        return
    where = address or os.environ.get("RAY_ADDRESS")
    if where and where not in ("auto", "local") and "://" not in where:
        _probe(where)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    except Exception as e:  # ConnectionError, RuntimeError (authentication), ValueError
        raise ClusterError(
            f"cannot {'connect to Ray at ' + where if where else 'start Ray here'}: "
            f"{_first_line(e)} (is the head up, `ray start --head`? With token "
            f"authentication: RAY_AUTH_MODE=token and the cluster's token, see docs/cluster.md)"
        ) from None
    finally:
        if main:  # ray.init makes SIGTERM exit at once; tbn-run stops cleanly on it instead
            signal.signal(signal.SIGTERM, previous)
    try:
        yield ray
    finally:
        ray.shutdown()


def start_workers(ray: Any, args: Tuple[Any, ...], device: Optional[str], *,
                  workers: Optional[int] = None, cpus_per_worker: Optional[int] = None,
                  retries: int = DEFAULT_RETRIES) -> Tuple[List[Any], List[Dict[str, Any]]]:
    """One ChunkWorker actor per GPU of the cluster (unless device is "cpu"), else one per
    `cpus_per_worker` cores of each node (None: DEFAULT_CPUS_PER_WORKER, or all the cores of
    the largest node if it has fewer); at most `workers`. args: ChunkWorker's arguments.
    Returns the actors, loaded, and what each said (node, pid, backend)."""
    from ray.exceptions import RayError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if device == "cuda" and not gpus:
        raise ClusterError("--device cuda: the Ray cluster has no GPU")
    if gpus and device != "cpu":
        fits, opts = gpus, {"num_gpus": 1, "num_cpus": 1}
    else:
        cpus = [int(r.get("CPU", 0)) for r in nodes]
        cpus_per_worker = cpus_per_worker or max(1, min(DEFAULT_CPUS_PER_WORKER, max(cpus)))
        fits = sum(c // cpus_per_worker for c in cpus)
        opts = {"num_cpus": cpus_per_worker}
        args = tuple(args) + (cpus_per_worker,)  # the worker's engine threads
        if not fits:
            raise ClusterError(f"no node of the Ray cluster has {cpus_per_worker} CPUs for a "
                               f"worker; lower --cpus-per-worker")
    if workers and workers > fits:
        log.warning("--workers %d: the cluster has room for %d", workers, fits)
    # Ray restarts a dead worker (on any node with room) and runs its chunk again
    remote = ray.remote(max_restarts=-1, max_task_retries=retries, **opts)(ChunkWorker)
    actors = [remote.remote(*args) for _ in range(min(workers or fits, fits))]
    try:
        info = ray.get([a.ready.remote() for a in actors])
        bad = next((i for i in info if i["error"]), None)
        if bad is not None:
            raise ClusterError(f"the worker on {bad['node']} cannot load the model: "
                               f"{bad['error']}")
    except (ClusterError, RayError) as e:
        for a in actors:
            ray.kill(a)
        raise ClusterError(str(e) if isinstance(e, ClusterError) else
                           f"a worker died while loading the model: {_first_line(e)}") from None
    return actors, info


def run_chunks(ray: Any, actors: List[Any], chunks: Sequence[Chunk], bar: Any
               ) -> Tuple[Dict[Chunk, Dict[str, Any]], Dict[Chunk, str]]:
    """Run chunks on the actors through Ray's ActorPool (the next chunk to the next idle worker,
    the largest first); returns the markers of the chunks done and the errors of the others."""
    from ray.exceptions import RayError
    from ray.util import ActorPool

    pool = ActorPool(actors)
    running: Dict[Any, Chunk] = {}

    def call(actor: Any, chunk: Chunk) -> Any:
        ref = actor.run.remote(chunk)
        running[ref] = chunk
        return ref

    for c in sorted(chunks, key=lambda c: -c.size):
        pool.submit(call, c)
    done: Dict[Chunk, Dict[str, Any]] = {}
    failed: Dict[Chunk, str] = {}
    while pool.has_next():
        try:
            m = pool.get_next_unordered()
        except RayError:  # Ray's retries are spent (or run() raised): which chunk was it?
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            for ref in ready:
                try:
                    ray.get(ref)
                except RayError as e:
                    failed[running.pop(ref)] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        ref = next(r for r, c in running.items() if (c.video, c.start) == (m["video"],
                                                                             m["start"]))
        chunk = running.pop(ref)
        if "error" in m:
            failed[chunk] = m["error"]
        else:
            done[chunk] = m
            bar.update(m["frames"])
    for c in chunks:
        if c not in done and c not in failed:
            failed[c] = "not run: every worker was lost"
    return done, failed


def _not_repeatable(chunks: Sequence[Chunk]) -> str:
    return (f"{chunks[0].origin}: its chunks disagree at their borders even decoded from frame "
            f"0; run tbn-run on it without --ray")


class _Corpus:
    """The state of one corpus run (see run_corpus): the plan, the markers of the chunks done,
    the failures; Ray and the workers started on the first chunks to run."""

    def __init__(self, out_dir: str, export: str, fmt: str, opts: Dict[str, Any]) -> None:
        self.out_dir, self.export, self.fmt, self.opts = out_dir, export, fmt, opts
        self.model = sha256_file(os.path.join(export, MANIFEST_NAME))
        self.plan: Dict[str, List[Chunk]] = {}
        self.finished: List[str] = []             # coco-rle videos complete before this run
        self.markers: Dict[Chunk, Dict[str, Any]] = {}
        self.resumed: Set[Chunk] = set()
        self.failed: Dict[str, str] = {}
        self.info: List[Dict[str, Any]] = []      # what each worker said when it loaded
        self.redone: List[str] = []               # videos decoded from frame 0 after a seek
        self.actors: List[Any] = []
        self.bar: Any = None
        self.ray: Any = None
        self.start = time.perf_counter()
        self.loaded: Optional[float] = None       # seconds until the workers had loaded

    def fail(self, video: str, error: str) -> None:
        if video not in self.failed:
            self.failed[video] = error
            log.error("%s", error)

    def make_plan(self, videos: Sequence[Video], chunk_frames: int, history: int,
                  resume: bool) -> List[Chunk]:
        """Every video's chunks, the markers of those complete (resume); the chunks to run."""
        done = MaskOutput(self.out_dir, self.fmt)
        for v in videos:
            if resume and self.fmt == "coco-rle" and done.video_complete(v.name):
                self.finished.append(v.name)
                continue
            try:
                self.plan[v.name] = plan_video(v, chunk_frames, history)
            except SourceError as e:
                self.fail(v.name, str(e))
        for video, chunks in self.plan.items():
            sweep_stale(state_dir(self.out_dir, video))
            for c in chunks:
                m = read_marker(self.out_dir, c, self.fmt, self.model) if resume else None
                if m is not None:
                    self.markers[c] = m
        self.resumed = set(self.markers)
        log.info("%d videos in %d chunks%s", len(self.plan), sum(map(len, self.plan.values())),
                 f", {len(self.resumed)} done before" if self.resumed else "")
        return [c for chunks in self.plan.values() for c in chunks if c not in self.markers]

    def execute(self, stack: ExitStack, chunks: List[Chunk]) -> None:
        """Run chunks on the workers (Ray and the workers started the first time)."""
        if self.ray is None:
            self.ray = stack.enter_context(ray_session(self.opts["address"],
                                                       self.opts["verbose"]))
            args = (self.export, self.opts["backend"], self.opts["device"], self.out_dir,
                    self.fmt, self.model)
            self.actors, self.info = start_workers(
                self.ray, args, self.opts["device"], workers=self.opts["workers"],
                cpus_per_worker=self.opts["cpus_per_worker"], retries=self.opts["retries"])
            self.loaded = time.perf_counter() - self.start
            stack.callback(lambda: [self.ray.kill(a) for a in self.actors])
            log.info("%d worker%s: %s", len(self.actors), "s" * (len(self.actors) != 1),
                     self.info[0]["backend"])
            self.bar = stack.enter_context(progress_bar(
                0, "", self.opts["progress"] and sys.stderr.isatty(), unit="frame"))
        self.bar.total += sum(c.size for c in chunks)
        self.bar.refresh()
        done, errors = run_chunks(self.ray, self.actors, chunks, self.bar)
        self.markers.update(done)
        for c, error in errors.items():
            self.fail(c.video, error)

    def bad_seeks(self) -> List[Chunk]:
        """Where a seek landed on another frame: the video's later chunks again, decoded from
        frame 0 (their markers removed); a video whose chunks were decoded so already fails."""
        redo = []
        for video, chunks in self.plan.items():
            if video in self.failed or not seek_mismatches([self.markers[c] for c in chunks]):
                continue
            seeked = [c for c in chunks if c.start and self.markers[c]["read"] == "seek"]
            if not seeked:
                self.fail(video, _not_repeatable(chunks))
                continue
            log.warning("%s: seeking is not frame-exact for this file; its chunks after the "
                        "first are done again, decoded from frame 0", chunks[0].origin)
            self.redone.append(video)
            for c in seeked:
                os.remove(marker_path(self.out_dir, c))
                del self.markers[c]
                self.resumed.discard(c)
                redo.append(dataclasses.replace(c, exact=True))
        return redo

    def check_redone(self) -> None:
        for video in self.redone:
            if video not in self.failed and seek_mismatches([self.markers[c]
                                                             for c in self.plan[video]]):
                self.fail(video, _not_repeatable(self.plan[video]))


def run_corpus(source: Union[str, Sequence[Video]], out_dir: str, *,
               export: Optional[str] = None, backend: str = "auto",
               device: Optional[str] = None, fmt: str = "png", address: Optional[str] = None,
               chunk_frames: Optional[int] = None, workers: Optional[int] = None,
               cpus_per_worker: Optional[int] = None, resume: bool = False,
               retries: int = DEFAULT_RETRIES, progress: bool = True,
               verbose: bool = False) -> Dict[str, Any]:
    """Segment every video of `source` on a Ray cluster into out_dir, a folder every node sees
    (paths are made absolute: the nodes must see them at the same place).

    chunk_frames: None for DEFAULT_CHUNK_FRAMES, 0 for whole videos only. cpus_per_worker and
    workers: see start_workers (None: as many workers as the cluster holds). Returns the
    stats: a table of the videos (frames, fps, nodes) and "failed_videos" ({video: error}: each
    logged as it fails; the run goes on without them, --resume retries them). Raises
    ClusterError (Ray missing or unreachable, no worker can start), ManifestError and
    SourceError.
    """
    export = os.path.abspath(export or default_export())
    history = max([int(k) for k in load_manifest(export).temporal_offsets] + [1])
    out_dir = os.path.abspath(out_dir)
    videos = videos_of(source)
    check_names(videos, out_dir)
    if not resume:
        shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    run = _Corpus(out_dir, export, fmt, dict(
        address=address, verbose=verbose, backend=backend, device=device, workers=workers,
        cpus_per_worker=cpus_per_worker, retries=retries, progress=progress))
    todo = run.make_plan(videos, DEFAULT_CHUNK_FRAMES if chunk_frames is None else chunk_frames,
                         history, resume)
    with ExitStack() as stack:                    # unwinds: bar, workers, Ray
        if todo:
            run.execute(stack, todo)
        redo = run.bad_seeks()
        if redo:
            run.execute(stack, redo)
            run.check_redone()
    wall = time.perf_counter() - run.start
    for video, chunks in run.plan.items():
        sweep_stale(os.path.join(out_dir, video))  # temporaries of workers killed mid-write
        if fmt == "coco-rle" and video not in run.failed:
            join_coco(out_dir, chunks)
    stats = _summary(run.plan, run.markers, run.resumed, run.failed, run.finished, run.info,
                     fmt, wall, run.redone)
    stats["startup_s"] = round(run.loaded, 3) if run.loaded is not None else None
    return stats


def _summary(plan: Dict[str, List[Chunk]], markers: Dict[Chunk, Dict[str, Any]],
             resumed: Set[Chunk], failed: Dict[str, str], finished: List[str],
             info: List[Dict[str, Any]], fmt: str, wall: float,
             redone: List[str]) -> Dict[str, Any]:
    """The stats of a corpus run; keys shared with run_stream's where they mean the same."""
    table = []
    for video, chunks in plan.items():
        if video in failed:
            continue
        ms = [markers[c] for c in chunks]
        frames, seconds = sum(m["frames"] for m in ms), sum(m["seconds"] for m in ms)
        table.append({"video": video, "frames": frames,
                      # one worker's rate on this video: its frames over the chunks' seconds
                      "fps": round(frames / seconds, 3) if seconds > 0 else None,
                      "node": ", ".join(sorted({m["node"] for m in ms})),
                      "chunks": len(ms), "seconds": round(seconds, 3),
                      "resumed": all(c in resumed for c in chunks)})
    now = sum(m["frames"] for c, m in markers.items() if c not in resumed)
    nodes = sorted({i["node"] for i in info})
    return {
        "backend": (f"{len(info)} Ray worker{'s' * (len(info) != 1)} on {len(nodes)} "
                    f"node{'s' * (len(nodes) != 1)}: {info[0]['backend']}" if info
                    else "no Ray worker needed: every chunk was done before"),
        "format": fmt,
        "videos": len(table) + len(finished),
        "videos_resumed": sum(r["resumed"] for r in table) + len(finished),
        "chunks": sum(r["chunks"] for r in table),
        "chunks_resumed": len(resumed),
        "frames": sum(r["frames"] for r in table),
        "frames_resumed": sum(markers[c]["frames"] for c in resumed),
        "wall_s": round(wall, 4),     # startup_s (Ray and the workers loading) included
        # frames segmented by this run over its wall time (all workers together)
        "fps": round(now / wall, 3) if wall > 0 and now else None,
        "workers": info,
        "videos_decoded_from_start": redone,
        "table": table,
        "failed_videos": failed,
    }
