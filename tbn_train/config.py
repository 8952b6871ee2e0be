"""Training configuration: one dataclass, packaged presets (YAML), user YAMLs and CLI overrides.

Order of precedence: dataclass defaults (tbn_swin_l's settings) < `--preset NAME`
(tbn_train/configs/NAME.yaml) or `--config FILE` < CLI flags (`--lr 0.01`, `--iters 100`,
`--set key=value`). Unknown presets and fields raise ValueError with the known names.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
AMP_MODES = ("none", "bf16", "fp16")
LOSSES = ("ce", "ohem")


@dataclass
class TrainConfig:
    # model
    model: str = "tbn_swin_l"
    pretrained: Optional[str] = "timm"   # None: random init; "timm": hub; or a local file
    num_classes: int = 124
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "data/vspw"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: Tuple[int, int] = (480, 480)
    # the frame size the model is deployed at: tbn-export's default export size
    # (VSPW 480p frames are 480 x 853; the model pads them to 480 x 864 inside)
    eval_size: Tuple[int, int] = (480, 853)
    scale_range: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    temporal_reverse: float = 0.0        # P(a training clip runs backwards); VSPW baseline: 0.5
    workers: int = 4
    # batch: global batch = batch_size * accum * world size
    batch_size: int = 1                  # clips per process per micro-step
    accum: int = 1                       # gradient accumulation micro-steps
    global_batch: int = 8                # > 0: accum is derived from it (must divide)
    # schedule (stage 1)
    iters: int = 80000                   # > 0 wins over epochs
    epochs: int = 0
    lr: float = 0.002
    backbone_lr_mult: float = 1.0        # stage-1 lr factor of the backbone (VSPW baseline: 0.1)
    momentum: float = 0.9
    weight_decay: float = 0.0005
    no_decay: str = "norm_bias_pos"      # norm_bias_pos (timm, mmseg) | bias (VSPW baseline) | none
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    loss: str = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    aux_weight: float = 1.0
    # stage 2 (fine-tuning from stage 1; 0 iters: the preset has no stage 2)
    stage2_iters: int = 40000
    stage2_lr_context: float = 0.0002
    stage2_lr_rest: float = 0.0005
    stage2_loss: str = "ohem"
    # runtime
    amp: str = "none"                    # none | bf16 | fp16 (CUDA only)
    grad_checkpointing: bool = False
    past_grad: bool = True               # False: past frames without autograd (less memory)
    eval_interval: int = 2000
    log_interval: int = 20
    seed: int = 0
    out: str = "runs/tbn"
    device: str = "auto"                 # auto | cpu | cuda | cuda:N

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TUPLES = {"crop_size": int, "eval_size": int, "scale_range": float}
_BOOLS = {"flip", "grad_checkpointing", "past_grad"}


def list_presets() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one field value from YAML/CLI."""
    if key not in FIELDS:
        raise ValueError(f"unknown config field '{key}'; known fields: {', '.join(FIELDS)}")
    if key in _TUPLES:
        if isinstance(value, str):
            value = value.replace("x", ",").split(",")
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{key} must be two numbers, got {value!r}")
        return tuple(_TUPLES[key](v) for v in value)
    if key in _BOOLS:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if key == "model_kwargs":
        if not isinstance(value, dict):
            raise ValueError(f"model_kwargs must be a mapping, got {value!r}")
        return dict(value)
    if key == "pretrained":
        return None if value in (None, "", "none", "null") else str(value)
    default = FIELDS[key].default
    try:
        if isinstance(default, bool):
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a {type(default).__name__}, got {value!r}") from None
    return str(value)


def load_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of field: value")
    return data


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset '{name}'; known presets: {', '.join(list_presets())}")
    return path


def make_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then a preset or a YAML file, then overrides; validated."""
    values: Dict[str, Any] = {}
    if preset and config_file:
        raise ValueError("pass --preset or --config, not both")
    if preset:
        values.update(load_yaml(preset_path(preset)))
    if config_file:
        values.update(load_yaml(Path(config_file)))
    values.update(overrides or {})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got '{cfg.amp}'")
    for key in ("loss", "stage2_loss"):
        if getattr(cfg, key) not in LOSSES:
            raise ValueError(f"{key} must be one of {', '.join(LOSSES)}, got "
                             f"'{getattr(cfg, key)}'")
    if cfg.iters <= 0 and cfg.epochs <= 0:
        raise ValueError("set iters or epochs to a positive number")
    for key in ("batch_size", "accum", "eval_interval", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0 or cfg.stage2_lr_context < 0 or cfg.stage2_lr_rest <= 0:
        raise ValueError("learning rates must be positive")
    if not 0 < cfg.ohem_thresh <= 1 or cfg.ohem_min_kept < 0:
        raise ValueError("ohem_thresh must be in (0, 1] and ohem_min_kept >= 0")


# -- command line -------------------------------------------------------------------------------
_ALIASES = {"data": ["--data"], "out": ["--out"], "iters": ["--iters"], "accum": ["--accum"]}


def add_override_args(parser: argparse.ArgumentParser) -> None:
    """One flag per field (--batch-size, --lr, --crop-size 480 480, --past-grad/--no-past-grad,
    ...) plus --set key=value; all default to None (= not overridden)."""
    group = parser.add_argument_group("config overrides (any field of the config)")
    for name, f in FIELDS.items():
        flags = _ALIASES.get(name, [f"--{name.replace('_', '-')}"])
        if name in _BOOLS:
            group.add_argument(*flags, dest=name, default=None,
                               action=argparse.BooleanOptionalAction)
        elif name in _TUPLES:
            group.add_argument(*flags, dest=name, default=None, nargs=2, metavar=("A", "B"))
        elif name == "model_kwargs":
            continue  # YAML or --set model_kwargs={...}
        else:
            group.add_argument(*flags, dest=name, default=None, metavar=name.upper())
    group.add_argument("--set", dest="set_values", action="append", default=[],
                       metavar="KEY=VALUE", help="any field, value parsed as YAML")


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in args.set_values:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = yaml.safe_load(value) if isinstance(value, str) else value
    return out
