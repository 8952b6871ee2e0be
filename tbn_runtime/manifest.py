"""The export manifest: the contract between tbn-export and the runtime (standard library only).

An export directory holds feature.onnx, temporal.onnx, optionally feature.engine and
temporal.engine (TensorRT), and manifest.json, which says everything the runtime needs to chain
them: the export size and input format, the feature shape and dtype, the temporal offsets and
ring size, the tensor names, each file's sha256, and what the engines were built on.
"""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .errors import TbnError
from .files import atomic_write_text, sha256_file

FORMAT = "tbn-vit-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
FEATURE_DTYPES = ("float32", "float16")
#: the smallest export side (the graphs pad to a multiple of 32) and a sanity bound on the largest
MIN_SIDE, MAX_SIDE = 32, 16384
#: the name of the batch axis (axis 0) of every input and output of the exported graphs
BATCH_AXIS = "batch"
#: the largest past offset a runtime accepts: the ring holds max(offset) + 1 features per stream
MAX_OFFSET = 64


#: the field holding the sha256 of the rest of the manifest: the offsets, ring size, sizes and
#: precision that tell the runtime how to chain the graphs are bound to the graphs' own sha256s
#: (in 'files'), so a manifest edited by hand is refused rather than run with the wrong past
CONTENT_HASH = "content_sha256"


class ManifestError(TbnError, ValueError):
    """An export directory the runtime cannot use; the message names the file and the fix."""


def content_sha256(data: Dict[str, Any]) -> str:
    """The sha256 of a manifest's fields (all but CONTENT_HASH), as canonical JSON."""
    rest = {k: v for k, v in data.items() if k != CONTENT_HASH}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Manifest:
    model: str                       # registry name, e.g. "tbn_swin_l"
    num_classes: int
    class_names: List[str]
    palette: List[List[int]]         # RGB per train id
    height: int                      # export size: the frame size the feature engine takes
    width: int
    mean: List[float]                # RGB, 0..255 scale, applied inside the feature graph
    std: List[float]
    feature_shape: List[int]         # 1 x C x h x w
    feature_dtype: str               # "float32" or "float16"
    temporal_offsets: List[int]      # e.g. [3, 6, 9]; [] for image models
    precision: str                   # "fp32", "fp16", "bf16" or "int8" (feature engine; temporal
                                     # float)
    label_dtype: str = "uint8"       # dtype of the per-pixel train ids the temporal engine emits
    input_format: str = "uint8 NHWC BGR"  # the frame as OpenCV decodes it
    # tensor names
    frame_input: str = "frame"
    feature_output: str = "feature"
    current_input: str = "current"
    past_inputs: List[str] = field(default_factory=list)   # one per offset, same order
    labels_output: str = "labels"
    logits_output: Optional[str] = None                     # present with --logits
    # every input and output has a batch axis (one frame per stream); TensorRT engines take
    # 1..max_batch (their optimization profile), the other backends any batch
    max_batch: int = 1
    # files: name -> {"sha256": ..., "bytes": ...}
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)      # {"path", "sha256"}
    versions: Dict[str, Optional[str]] = field(default_factory=dict)  # torch, onnx, tensorrt...
    tensorrt: Optional[Dict[str, Any]] = None   # {"version", "gpu", "compute_capability"}
    quantization: Optional[Dict[str, Any]] = None  # int8: quantizer, settings, calibration
    # what each engine computes in where the graph's types do not say it (bf16: fp32 graphs,
    # {"graph": "fp32", "feature": "bf16", "temporal": "fp32"}); None: as the graph is typed
    compute_precision: Optional[Dict[str, str]] = None
    # tbn-export --verify's checks, by backend: {"ort": {"passed": true, "labels_agree": ...,
    # "required": ..., "frames": ..., "machine": "<cpu> (<extensions>)"}, "openvino": {...}};
    # a backend recorded as failed refuses the export. None: not verified
    verified: Optional[Dict[str, Dict[str, Any]]] = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def ring_size(self) -> int:
        """Slots in the feature ring: max(offset) + 1 (1 for image models)."""
        return max(self.temporal_offsets, default=0) + 1

    def to_json(self) -> str:
        data = asdict(self)
        data["ring_size"] = self.ring_size
        data[CONTENT_HASH] = content_sha256(data)
        return json.dumps(data, indent=2)

    def save(self, export_dir: str) -> None:
        atomic_write_text(os.path.join(export_dir, MANIFEST_NAME), self.to_json() + "\n")

    def add_file(self, export_dir: str, name: str) -> None:
        """Record a file of the export dir with its sha256 and size."""
        path = os.path.join(export_dir, name)
        self.files[name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}

    def verify_file(self, export_dir: str, name: str) -> str:
        """Path of a listed file after checking its sha256; ManifestError if it differs."""
        path = os.path.join(export_dir, name)
        if name not in self.files:
            raise ManifestError(f"{os.path.join(export_dir, MANIFEST_NAME)} does not list {name}; "
                                f"export again with tbn-export")
        if not os.path.isfile(path):
            raise ManifestError(f"{path} is missing; export again with tbn-export")
        if sha256_file(path) != self.files[name]["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in its manifest (changed or "
                                f"truncated since export); export again with tbn-export")
        return path


def load_manifest(export_dir: str) -> Manifest:
    """Read and validate export_dir/manifest.json; ManifestError names the file and the field."""
    path = os.path.join(export_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ManifestError(f"no {MANIFEST_NAME} in {export_dir}: not an export directory "
                            f"(make one with tbn-export, or pass --model EXPORT_DIR)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); export again with tbn-export") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a tbn-vit export manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(f"{path} is export format {version}, newer than this tbn-vit reads "
                            f"({FORMAT_VERSION}); upgrade tbn-vit or export with this version")
    recorded = data.get(CONTENT_HASH)
    digest = content_sha256(data)
    ring_size = data.pop("ring_size", None)
    known = set(Manifest.__dataclass_fields__)
    try:
        manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise ManifestError(f"{path} lacks a field the runtime needs ({e}); export again") from e
    problem = validate(manifest, ring_size)
    if problem:
        raise ManifestError(f"{path}: {problem}; export again with tbn-export (a manifest is "
                            f"written by tbn-export, not by hand)")
    if recorded != digest:
        why = ("carries no content hash (written by an older tbn-export, or edited)"
               if recorded is None else
               "was changed after export (its fields no longer match the content_sha256 "
               "tbn-export recorded)")
        raise ManifestError(f"{path} {why}: the offsets, sizes and precision it states are "
                            f"bound to the graphs; export again with tbn-export (a manifest is "
                            f"written by tbn-export, not by hand)")
    return manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def validate(m: Manifest, ring_size: Any = None) -> Optional[str]:
    """The first problem of a manifest as "field 'x' ...", or None when it is usable.

    Checks types and ranges (sizes, classes, offsets against the ring), the dtypes against the
    allowed sets, that class names and palette have one entry per class, that tensor names are
    distinct, and that listed files are plain names inside the export (no path separators).
    Long on purpose: one check per field, in the schema's order, read as a table.
    """
    def bad(name: str, want: str) -> str:
        return f"field '{name}' must be {want}, got {getattr(m, name)!r}"

    if not isinstance(m.model, str) or not m.model:
        return bad("model", "a model name")
    if not _is_int(m.num_classes) or not 1 <= m.num_classes <= 255:
        return bad("num_classes", "an integer in 1..255 (labels are uint8, 255 is 'ignore')")
    if not isinstance(m.class_names, list) or not all(isinstance(c, str) for c in m.class_names):
        return bad("class_names", "a list of names")
    if len(m.class_names) != m.num_classes:
        return (f"field 'class_names' has {len(m.class_names)} names for num_classes "
                f"{m.num_classes}")
    if not isinstance(m.palette, list) or not all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
            for c in m.palette):
        return "field 'palette' must be a list of [r, g, b] colours with values 0..255"
    if len(m.palette) != m.num_classes:
        return f"field 'palette' has {len(m.palette)} colours for num_classes {m.num_classes}"
    for name in ("height", "width"):
        v = getattr(m, name)
        if not _is_int(v) or not MIN_SIDE <= v <= MAX_SIDE:
            return bad(name, f"an integer in {MIN_SIDE}..{MAX_SIDE}")
    for name in ("mean", "std"):
        v = getattr(m, name)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
            return bad(name, "three numbers (R, G, B)")
    if not all(x > 0 for x in m.std):
        return bad("std", "three positive numbers")
    fs = m.feature_shape
    if not isinstance(fs, list) or len(fs) != 4 or not all(_is_int(d) and d > 0 for d in fs) \
            or fs[0] != 1:
        return bad("feature_shape", "[1, channels, height, width] with positive integers")
    if m.feature_dtype not in FEATURE_DTYPES:
        return bad("feature_dtype", f"one of {', '.join(FEATURE_DTYPES)}")
    if m.precision not in PRECISIONS:
        return bad("precision", f"one of {', '.join(PRECISIONS)}")
    if m.precision == "fp16" and m.feature_dtype != "float16" or \
            m.precision in ("fp32", "bf16") and m.feature_dtype != "float32":
        return (f"field 'feature_dtype' {m.feature_dtype!r} does not go with precision "
                f"{m.precision!r}")
    if not _is_int(m.max_batch) or not 1 <= m.max_batch <= 256:
        return bad("max_batch", "an integer in 1..256")
    if m.label_dtype != "uint8":
        return bad("label_dtype", "'uint8'")
    if m.input_format != "uint8 NHWC BGR":
        return bad("input_format", "'uint8 NHWC BGR'")
    offs = m.temporal_offsets
    if not isinstance(offs, list) or not all(_is_int(k) and 1 <= k <= MAX_OFFSET for k in offs):
        return bad("temporal_offsets", f"a list of integers in 1..{MAX_OFFSET} (frames back)")
    if len(set(offs)) != len(offs):
        return bad("temporal_offsets", "distinct offsets")
    if ring_size is not None and ring_size != m.ring_size:
        return (f"field 'ring_size' is {ring_size!r} but the offsets {offs} need "
                f"{m.ring_size} slots")
    names = [m.frame_input, m.feature_output, m.current_input, m.labels_output]
    if not isinstance(m.past_inputs, list) or len(m.past_inputs) != len(offs):
        return (f"field 'past_inputs' must name one input per offset ({len(offs)}), got "
                f"{m.past_inputs!r}")
    names += list(m.past_inputs) + ([m.logits_output] if m.logits_output is not None else [])
    if not all(isinstance(n, str) and n for n in names):
        return f"tensor names must be non-empty strings, got {names!r}"
    if len(set(names)) != len(names):
        return f"tensor names must be distinct, got {names!r}"
    if not isinstance(m.files, dict) or "feature.onnx" not in m.files \
            or "temporal.onnx" not in m.files:
        return "field 'files' must list feature.onnx and temporal.onnx"
    for name, info in m.files.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
                or "\\" in name or os.path.isabs(name):
            return f"field 'files' lists {name!r}: file names must be plain names in the export"
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not _SHA256.match(info["sha256"]) or not _is_int(info.get("bytes")) \
                or info["bytes"] < 0:
            return f"field 'files' entry {name!r} must have a sha256 (64 hex digits) and bytes"
    if not isinstance(m.checkpoint, dict):
        return bad("checkpoint", "an object with 'path' and 'sha256'")
    for name in ("versions",):
        if not isinstance(getattr(m, name), dict):
            return bad(name, "an object")
    for name in ("tensorrt", "quantization", "compute_precision", "verified"):
        if getattr(m, name) is not None and not isinstance(getattr(m, name), dict):
            return bad(name, "an object or null")
    if m.verified is not None and not all(
            isinstance(v, dict) and isinstance(v.get("passed"), bool)
            for v in m.verified.values()):
        return bad("verified", "an object of {backend: {'passed': true|false, ...}}")
    if m.precision == "bf16" and not m.compute_precision:
        return "field 'compute_precision' must say what a bf16 export's engines compute in"
    if m.precision == "int8" and not m.quantization:
        return "field 'quantization' must describe how an int8 export was quantized"
    return None
