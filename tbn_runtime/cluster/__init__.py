"""A corpus of videos across a Ray cluster: `tbn-run SOURCE --out DIR --ray [ADDRESS]`.

    from tbn_runtime.cluster import run_corpus
    stats = run_corpus("videos/", "masks/", export="runs/tbn/export", address="auto")

One stateful Ray actor per GPU (or per `cpus_per_worker` cores of a node without one) loads
the export once (a Segmenter) and streams chunks in frame order: whole videos, and videos longer
than `chunk_frames` cut into consecutive chunks. A chunk that starts at frame s > 0 first pushes
frames s - m .. s - 1 through the feature engine only, m = max(temporal offsets), so its ring
holds what a single run's ring holds at frame s and every mask equals the single run's (the
stream driver's `Job(lead=...)`, tbn_runtime.driver). Masks go to OUT, a folder every node
sees (a shared file system), each file written atomically by the worker that computed it. Ray
does the rest: its ActorPool hands chunks to idle workers, and a worker that dies (killed, out
of memory, its node lost) is restarted by Ray, which runs its chunk again (`max_restarts`, `max_task_retries`).

Reading a chunk (tbn_runtime.sources.frames_from): video files seek to s - m
(CAP_PROP_POS_FRAMES), frame-exact for constant frame rate files but not promised for every
file. So each chunk records digests of the frames it decoded before s, and each chunk but the
last those of its own last m frames; where a chunk's disagree with its predecessor's, the
video's later chunks are run again decoding from frame 0, and the run says so. Frame folders
are exact by construction.

Completeness and resume: a chunk is complete when its marker OUT/.tbn-cluster/<video>/<start>.json
exists; the worker writes it last, after every mask of the chunk is on disk, with the frames,
seconds, node and the digest of the model's manifest. --resume skips the chunks whose marker
matches the planned chunk and the model; a chunk cut short is done again whole (the unit of
resume is the chunk: start again with the same --chunk-frames). With coco-rle (one JSON per
video) each chunk writes its part under .tbn-cluster and the driver joins the parts into
OUT/<video>.json, the document a single run writes, once every chunk of the video is complete.

chunks.py holds what runs without Ray (the plan, a chunk's work, the markers); driver.py
connects to Ray, starts the workers and runs the corpus. Ray is imported only there, on use.
"""

from .chunks import (DEFAULT_CHUNK_FRAMES, Chunk, ChunkWorker, join_coco, plan_video,
                     read_marker, run_chunk, seek_mismatches)
from .driver import (DEFAULT_CPUS_PER_WORKER, DEFAULT_RETRIES, ClusterError, ray_session,
                     run_corpus, start_workers)

__all__ = ["run_corpus", "ClusterError", "Chunk", "ChunkWorker", "plan_video", "run_chunk",
           "read_marker", "seek_mismatches", "join_coco", "ray_session", "start_workers",
           "DEFAULT_CHUNK_FRAMES", "DEFAULT_CPUS_PER_WORKER", "DEFAULT_RETRIES"]
