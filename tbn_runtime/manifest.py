"""The export manifest: the contract between tbn-export and the runtime (standard library only).

An export directory holds feature.onnx, temporal.onnx, optionally feature.engine and
temporal.engine (TensorRT), and manifest.json, which says everything the runtime needs to chain
them: the export size and input format, the feature shape and dtype, the temporal offsets and
ring size, the tensor names, each file's sha256, and what the engines were built on.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .files import atomic_write, sha256_file

FORMAT = "tbn-vit-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """An export directory the runtime cannot use; the message names the file and the fix."""


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
    precision: str                   # "fp32", "fp16" or "int8" (Q/DQ feature graph)
    label_dtype: str = "uint8"       # dtype of the per-pixel train ids the temporal engine emits
    input_format: str = "uint8 NHWC BGR"  # the frame as OpenCV decodes it
    # tensor names
    frame_input: str = "frame"
    feature_output: str = "feature"
    current_input: str = "current"
    past_inputs: List[str] = field(default_factory=list)   # one per offset, same order
    labels_output: str = "labels"
    logits_output: Optional[str] = None                     # present with --logits
    # files: name -> {"sha256": ..., "bytes": ...}
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)      # {"path", "sha256"}
    versions: Dict[str, Optional[str]] = field(default_factory=dict)  # torch, onnx, tensorrt...
    tensorrt: Optional[Dict[str, Any]] = None   # {"version", "gpu", "compute_capability"}
    # int8: the quantizer, its settings and the calibration (source, frame count)
    quantization: Optional[Dict[str, Any]] = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def ring_size(self) -> int:
        """Slots in the feature ring: max(offset) + 1 (1 for image models)."""
        return max(self.temporal_offsets, default=0) + 1

    def to_json(self) -> str:
        data = asdict(self)
        data["ring_size"] = self.ring_size
        return json.dumps(data, indent=2)

    def save(self, export_dir: str) -> None:
        path = os.path.join(export_dir, MANIFEST_NAME)

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(self.to_json() + "\n")
        atomic_write(path, write)

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
    """Read and validate export_dir/manifest.json."""
    path = os.path.join(export_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ManifestError(f"no {MANIFEST_NAME} in {export_dir}: not an export directory "
                            f"(make one with tbn-export, or pass --model EXPORT_DIR)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); export again with tbn-export") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a tbn-vit export manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(f"{path} is export format {version}, newer than this tbn-vit reads "
                            f"({FORMAT_VERSION}); upgrade tbn-vit or export with this version")
    data.pop("ring_size", None)
    known = set(Manifest.__dataclass_fields__)
    try:
        return Manifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise ManifestError(f"{path} lacks a field the runtime needs ({e}); export again") from e
