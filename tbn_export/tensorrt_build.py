"""Build TensorRT engines from an export directory (feature.engine, temporal.engine).

Written against the documented TensorRT 10/11 Python API: a strongly typed network
(NetworkDefinitionCreationFlag.STRONGLY_TYPED: the precision is the ONNX graph's, which is the
only way TensorRT 11 offers, since it removed the FP16/INT8 builder flags), the ONNX parser, a
workspace limit, and a timing cache kept in the export directory (timing.cache) so that
rebuilding, or building the second engine, reuses the tactic timings.

`import tensorrt` happens inside the functions: this module imports on any machine and the
rest of tbn_export never needs TensorRT. Build failures raise EngineBuildError naming the ONNX
node / layer that failed; the ONNX files are never touched.

NOTE: this module could not be run where it was written (no GPU, TensorRT not installable); it
follows NVIDIA's API reference and samples. tests/test_export.py runs it where tensorrt imports
and a GPU is present.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import onnx

from tbn_runtime.files import atomic_write, temporary_name
from tbn_runtime.manifest import Manifest, load_manifest

from .errors import EngineBuildError

TIMING_CACHE = "timing.cache"
ENGINES = (("feature.onnx", "feature.engine"), ("temporal.onnx", "temporal.engine"))
LOG_LEVELS = ("verbose", "info", "warning", "error", "internal_error")


log = logging.getLogger("tbn_export")


def tensorrt_available() -> Tuple[bool, str]:
    """(True, version) when `import tensorrt` works, else (False, why)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # ImportError, or a wheel whose CUDA libraries are missing
        return False, f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, trt.__version__


def gpu_info() -> Dict[str, str]:
    """{"gpu": name, "compute_capability": "9.0"} of CUDA device 0 (cuda-python, which the
    TensorRT extras install); EngineBuildError saying why when there is no usable GPU."""
    from tbn_runtime.backends.base import BackendError
    from tbn_runtime.cuda import gpu_info as cuda_gpu_info

    try:
        name, cc = cuda_gpu_info(0)
    except BackendError as e:
        raise EngineBuildError(f"no usable GPU to build TensorRT engines for: {e}") from e
    return {"gpu": name, "compute_capability": cc}


def _make_logger(trt, level: str):
    """A trt.ILogger that prints at `level` and above and keeps every error message."""
    severities = {
        "verbose": trt.Logger.VERBOSE, "info": trt.Logger.INFO, "warning": trt.Logger.WARNING,
        "error": trt.Logger.ERROR, "internal_error": trt.Logger.INTERNAL_ERROR,
    }
    if level not in severities:
        raise ValueError(f"TensorRT log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    threshold = severities[level]
    as_logging = {int(trt.Logger.INTERNAL_ERROR): logging.CRITICAL,
                  int(trt.Logger.ERROR): logging.ERROR, int(trt.Logger.WARNING): logging.WARNING,
                  int(trt.Logger.INFO): logging.INFO, int(trt.Logger.VERBOSE): logging.DEBUG}

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: List[str] = []

        def log(self, severity, msg):  # lower enum value = more severe
            if int(severity) <= int(trt.Logger.ERROR):
                self.errors.append(str(msg))
            if int(severity) <= int(threshold):
                log.log(as_logging.get(int(severity), logging.INFO), "[TensorRT] %s", msg)

    return CapturingLogger()


def _parser_errors(parser) -> str:
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node_name = ""
        for attr in ("node_name", "node_operator"):  # TensorRT >= 10; older: node() index only
            fn = getattr(err, attr, None)
            if fn is not None:
                try:
                    value = fn()
                except Exception:
                    value = ""
                if value:
                    node_name += f"{attr.replace('_', ' ')} '{value}' "
        if not node_name:
            node_name = f"node #{err.node()} "
        parts.append(f"{node_name.strip()}: {err.desc()}")
    return "; ".join(parts) or "no error reported by the parser"


def _failing_layer(messages: List[str]) -> str:
    """The layer/node name in TensorRT's error messages, if one is named."""
    for msg in messages:
        for pattern in (r"[Ll]ayer[: ]+'?([^'\s:]+)'?", r"[Nn]ode[: ]+'?([^'\s:]+)'?",
                        r"^([^\s:]+): "):
            m = re.search(pattern, msg)
            if m:
                return m.group(1)
    return "unknown"


def _use_timing_cache(config: Any, path: str) -> None:
    """Give the builder the timing cache at `path`, or a fresh one.

    create_timing_cache returns None for bytes it cannot parse (a truncated file, another
    TensorRT's format); set_timing_cache with ignore_mismatch=False returns False for a cache of
    another GPU or TensorRT version. Either way the build starts from an empty cache, which is
    then written back over the unusable one.
    """
    cache_bytes = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if cache_bytes:
        log.warning("timing cache %s is not usable by this TensorRT/GPU; starting a new one",
                    path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise EngineBuildError("TensorRT could not create an empty timing cache")


def batch_profiles(max_batch: int) -> List[List[int]]:
    """The (min, opt, max) batch of each optimization profile: profile 0 takes one frame and
    is tuned for it (the common single stream); with max_batch > 1, profile 1 takes
    2..max_batch, tuned for max_batch (many streams). trt.py picks one by batch size."""
    profiles = [[1, 1, 1]]
    if max_batch > 1:
        profiles.append([2, max_batch, max_batch])
    return profiles


def _batch_profiles(builder: Any, network: Any, max_batch: int) -> List[Any]:
    """One TensorRT optimization profile per entry of batch_profiles on every input's batch
    axis (the other axes are static)."""
    out = []
    for lo, opt, hi in batch_profiles(max_batch):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise EngineBuildError(f"input '{tensor.name}' has a dynamic axis besides the "
                                       f"batch ({shape}); export again with this tbn-export")
            profile.set_shape(tensor.name, [lo] + shape[1:], [opt] + shape[1:],
                              [hi] + shape[1:])
        out.append(profile)
    return out


def build_engine(onnx_path: str, engine_path: str, timing_cache_path: str,
                 workspace_gb: float = 4.0, log_level: str = "warning",
                 max_batch: int = 1) -> Dict[str, Any]:
    """Parse onnx_path into a strongly typed network and write the serialized engine.

    The timing cache at timing_cache_path is read (if present) and written back after the
    build. Raises EngineBuildError naming the failing node (parse) or layer (build).
    """
    import tensorrt as trt

    logger = _make_logger(trt, log_level)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode in TensorRT 10+ (the flag is deprecated and ignored).
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if any(network.get_input(i).shape[0] < 0 for i in range(network.num_inputs)):
        for profile in _batch_profiles(builder, network, max_batch):
            config.add_optimization_profile(profile)
    _use_timing_cache(config, timing_cache_path)
    # Errors logged so far are the cache's (a cache of another TensorRT or GPU, which is then
    # not used): forget them, so that a failed build names its own failing layer.
    logger.errors.clear()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        layer = _failing_layer(logger.errors)
        detail = logger.errors[-1] if logger.errors else "no error message"
        raise EngineBuildError(f"TensorRT could not build {os.path.basename(engine_path)} from "
                               f"{onnx_path}: layer '{layer}' failed ({detail})")

    def write_engine(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    atomic_write(engine_path, write_engine)

    updated = config.get_timing_cache().serialize()

    def write_cache(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(memoryview(updated))
    atomic_write(timing_cache_path, write_cache)
    return {"layers": network.num_layers, "bytes": os.path.getsize(engine_path)}


def builds_bf16(manifest: Manifest, onnx_name: str) -> bool:
    """Whether the engine of onnx_name is built bf16: a bf16 export's graph that its manifest
    computes in bf16 (fp32 on disk: `compute_precision`). Every other engine takes the graph's
    own types."""
    return (manifest.compute_precision or {}).get(onnx_name.split(".")[0]) == "bf16"


@contextlib.contextmanager
def _typed_graph(onnx_path: str, bf16: bool) -> Iterator[str]:
    """The ONNX file to build from: onnx_path itself, or for bf16 a bf16-typed copy beside it
    (tbn_export.bf16; a strongly typed build takes its precision from the graph), removed
    after the build."""
    if not bf16:
        yield onnx_path
        return
    from .bf16 import convert_feature_graph

    typed = temporary_name(onnx_path, ".onnx")
    try:
        onnx.save(convert_feature_graph(onnx_path), typed)
        yield typed
    finally:
        if os.path.exists(typed):
            os.remove(typed)


def build_engines(export_dir: str, workspace_gb: float = 4.0, log_level: str = "warning",
                  manifest: Optional[Manifest] = None) -> Manifest:
    """Build feature.engine and temporal.engine in export_dir and record them in the manifest.

    The ONNX files are checked against the manifest's sha256 first; on failure the engines
    already written are removed and the ONNX export is left as it was.
    """
    import tensorrt as trt

    manifest = manifest or load_manifest(export_dir)
    info = gpu_info()  # before the builds: no GPU, no build
    cache_path = os.path.join(export_dir, TIMING_CACHE)
    written: List[str] = []
    try:
        for onnx_name, engine_name in ENGINES:
            onnx_path = manifest.verify_file(export_dir, onnx_name)
            engine_path = os.path.join(export_dir, engine_name)
            with _typed_graph(onnx_path, builds_bf16(manifest, onnx_name)) as source:
                build_engine(source, engine_path, cache_path, workspace_gb, log_level,
                             manifest.max_batch)
            written.append(engine_path)
    except BaseException:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        for _, engine_name in ENGINES:
            manifest.files.pop(engine_name, None)
        raise
    for _, engine_name in ENGINES:
        manifest.add_file(export_dir, engine_name)
    manifest.tensorrt = {"version": trt.__version__, "gpu": info["gpu"],
                         "compute_capability": info["compute_capability"],
                         "workspace_gb": workspace_gb, "strongly_typed": True,
                         "max_batch": manifest.max_batch,
                         "profiles": batch_profiles(manifest.max_batch)}
    manifest.versions["tensorrt"] = trt.__version__
    manifest.save(export_dir)
    return manifest
