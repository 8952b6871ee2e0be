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

from ..files import sha256_file, sweep_stale
from ..manifest import MANIFEST_NAME, load_manifest
from ..outputs import MaskOutput
from ..segmenter import default_export
from ..sources import SourceError, Video, open_source
from .chunks import (DEFAULT_CHUNK_FRAMES, STATE_DIR, Chunk, ChunkWorker, join_coco,
                     marker_path, plan_video, read_marker, seek_mismatches, state_dir)

log = logging.getLogger("tbn_runtime")

#: CPU cores per worker on nodes without a GPU (fewer where the largest node has fewer)
DEFAULT_CPUS_PER_WORKER = 4
#: how often Ray runs a chunk again after its worker died before the chunk counts as failed
DEFAULT_RETRIES = 3


class ClusterError(RuntimeError):
    """Ray missing or unreachable, or no worker can start; one-line message."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    from tqdm import tqdm

    chunk_frames = DEFAULT_CHUNK_FRAMES if chunk_frames is None else chunk_frames
    export = os.path.abspath(export or default_export())
    model = sha256_file(os.path.join(export, MANIFEST_NAME))
    history = max([int(k) for k in load_manifest(export).temporal_offsets] + [1])
    out_dir = os.path.abspath(out_dir)
    videos = open_source(source) if isinstance(source, (str, os.PathLike)) else list(source)
    seen: Dict[str, str] = {}
    for v in videos:
        if seen.setdefault(v.name, v.origin) != v.origin:
            raise SourceError(f"{seen[v.name]} and {v.origin} would both write {v.name}/ in "
                              f"{out_dir}; rename one")
    if not resume:
        shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    failed: Dict[str, str] = {}

    def fail(video: str, error: str) -> None:
        if video not in failed:
            failed[video] = error
            log.error("%s", error)

    plan: Dict[str, List[Chunk]] = {}
    finished: List[str] = []                      # coco-rle videos complete before this run
    for v in videos:
        if resume and fmt == "coco-rle" and MaskOutput(out_dir, fmt).video_complete(v.name):
            finished.append(v.name)
        else:
            try:
                plan[v.name] = plan_video(v, chunk_frames, history)
            except SourceError as e:
                fail(v.name, str(e))
    markers: Dict[Chunk, Dict[str, Any]] = {}
    for video, chunks in plan.items():
        sweep_stale(state_dir(out_dir, video))
        for c in chunks:
            m = read_marker(out_dir, c, fmt, model) if resume else None
            if m is not None:
                markers[c] = m
    resumed: Set[Chunk] = set(markers)
    todo = [c for chunks in plan.values() for c in chunks if c not in markers]
    log.info("%d videos in %d chunks%s", len(plan), sum(map(len, plan.values())),
             f", {len(resumed)} done before" if resumed else "")

    start = time.perf_counter()
    info: List[Dict[str, Any]] = []
    loaded: List[float] = []                       # seconds until the workers had loaded
    redone: List[str] = []
    with ExitStack() as stack:                    # unwinds: bar, workers, Ray
        actors: List[Any] = []
        bar: List[Any] = []                       # one progress bar over the whole corpus

        def execute(chunks: List[Chunk]) -> None:
            ray = stack.enter_context(ray_session(address, verbose))  # once: then a no-op
            if not actors:
                args = (export, backend, device, out_dir, fmt, model)
                started, said = start_workers(ray, args, device, workers=workers,
                                              cpus_per_worker=cpus_per_worker, retries=retries)
                actors.extend(started)
                info.extend(said)
                loaded.append(time.perf_counter() - start)
                stack.callback(lambda: [ray.kill(a) for a in actors])
                log.info("%d worker%s: %s", len(actors), "s" * (len(actors) != 1),
                         info[0]["backend"])
                bar.append(stack.enter_context(tqdm(
                    total=0, unit="frame", disable=not progress, file=sys.stderr,
                    dynamic_ncols=True, smoothing=0.1)))
            bar[0].total += sum(c.size for c in chunks)
            bar[0].refresh()
            done, errors = run_chunks(ray, actors, chunks, bar[0])
            markers.update(done)
            for c, error in errors.items():
                fail(c.video, error)

        if todo:
            execute(todo)
        # where a seek landed on another frame, decode the video's later chunks from frame 0
        redo = []
        for video, chunks in plan.items():
            if video in failed or not seek_mismatches([markers[c] for c in chunks]):
                continue
            seeked = [c for c in chunks if c.start and markers[c]["read"] == "seek"]
            if not seeked:
                fail(video, _not_repeatable(chunks))
                continue
            log.warning("%s: seeking is not frame-exact for this file; its chunks after the "
                        "first are done again, decoded from frame 0", chunks[0].origin)
            redone.append(video)
            for c in seeked:
                os.remove(marker_path(out_dir, c))
                del markers[c]
                resumed.discard(c)
                redo.append(dataclasses.replace(c, exact=True))
        if redo:
            execute(redo)
            for video in redone:
                if video not in failed and seek_mismatches([markers[c] for c in plan[video]]):
                    fail(video, _not_repeatable(plan[video]))
    wall = time.perf_counter() - start
    for video, chunks in plan.items():
        sweep_stale(os.path.join(out_dir, video))  # temporaries of workers killed mid-write
        if fmt == "coco-rle" and video not in failed:
            join_coco(out_dir, chunks)
    stats = _summary(plan, markers, resumed, failed, finished, info, fmt, wall, redone)
    stats["startup_s"] = round(loaded[0], 3) if loaded else None
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
