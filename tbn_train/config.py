"""Training configuration: one dataclass, packaged presets (YAML), user YAMLs and CLI overrides.

Order of precedence: dataclass defaults (tbn_swin_l's settings) < `--preset NAME`
(tbn_train/configs/NAME.yaml) or `--config FILE` < CLI flags (`--lr 0.01`, `--iters 100`,
`--set key=value`). `tbn-train --resume` without a preset or config file starts from the
config the run was trained with instead of the defaults. Unknown presets and fields raise
ConfigError (a ValueError) with the known names. FIELD_HELP explains every field (the --help of
tbn-train); RESUME_SAFE lists the fields --resume may change.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .errors import ConfigError

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
    save_minutes: float = 10.0           # also save last.* this often (0: only at evaluations)
    seed: int = 0
    out: str = "runs/tbn"
    device: str = "auto"                 # auto | cpu | cuda | cuda:N

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# What each field means: the help text of its tbn-train flag (a test checks that every field
# has one).
FIELD_HELP = {
    "model": "model variant: tbn_swin_l, tbn_swin_t, bisenet_swin_l, bisenet_swin_t, "
             "stppm_swin_l, stppm_r101, or the tiny test/demo ones (tbn_tiny, ...)",
    "pretrained": "backbone weights when stage 1 starts: timm (ImageNet, from timm's hub), a "
                  "local .safetensors or timm .pth file, or none (random init)",
    "num_classes": "classes the model predicts (VSPW: 124); every train id in the masks must "
                   "be below it",
    "model_kwargs": "extra arguments of the model (YAML or --set model_kwargs={...})",
    "data": "dataset root in the VSPW layout: train.txt, val.txt, data/<video>/{origin,mask}/",
    "train_split": "split to train on (ROOT/NAME.txt lists its videos)",
    "val_split": "split evaluated at each eval interval; best.safetensors has its best mIoU",
    "crop_size": "training crop, H W (padded with ignore where the scaled frame is smaller)",
    "eval_size": "frame size H W the model is deployed at: tbn-export's default size",
    "scale_range": "random scale of each clip, LOW HIGH, relative to the frame size",
    "flip": "random horizontal flip of each clip",
    "temporal_reverse": "probability that a training clip runs backwards (the VSPW "
                        "baseline's random temporal reversal: 0.5)",
    "backbone_lr_mult": "stage 1 learning-rate factor of the backbone (the VSPW baseline: 0.1)",
    "no_decay": "parameters without weight decay: norm_bias_pos (norms, biases, position "
                "tables), bias, or none",
    "workers": "DataLoader worker processes per training process (0: load in the main one)",
    "batch_size": "clips per process per micro-step",
    "accum": "gradient-accumulation micro-steps per optimizer step (when global_batch is 0)",
    "global_batch": "clips per optimizer step over all processes; accum is derived from it "
                    "(0: use --accum)",
    "iters": "stage 1 optimizer steps (> 0 wins over --epochs)",
    "epochs": "stage 1 length in passes over the training split, when iters is 0",
    "lr": "stage 1 learning rate (SGD)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "poly_power": "poly decay: lr x (1 - step/total)^power",
    "warmup_iters": "steps of linear lr warmup at the start of each stage (0: none)",
    "warmup_ratio": "lr factor at the first warmup step",
    "loss": "stage 1 loss: ce (cross-entropy) or ohem",
    "ohem_thresh": "OHEM: train on pixels whose true-class probability is below this",
    "ohem_min_kept": "OHEM: at least this many pixels per image (the hardest ones)",
    "aux_weight": "weight of the auxiliary heads' losses (0: none)",
    "stage2_iters": "stage 2 optimizer steps (0: no stage 2)",
    "stage2_lr_context": "stage 2 learning rate of the context path (the backbone, its ARMs, "
                         "global-context and merging convolutions)",
    "stage2_lr_rest": "stage 2 learning rate of the other layers",
    "stage2_loss": "stage 2 loss: ohem or ce",
    "amp": "mixed precision on CUDA: none, bf16 or fp16",
    "grad_checkpointing": "recompute the backbone's blocks in the backward pass: less memory, "
                          "more time",
    "past_grad": "backpropagate through the past frames; --no-past-grad runs them without "
                 "autograd (about 3/4 less backbone activation memory)",
    "eval_interval": "evaluate on val_split, save best.* and last.* every N steps (and at "
                     "the end)",
    "log_interval": "log loss, lr and speed every N steps",
    "save_minutes": "also save last.* every N minutes, so a kill -9 loses at most that much "
                    "(0: only at evaluations)",
    "seed": "seed of the initialisation, the data order and the augmentation",
    "out": "run directory: stage1/, stage2/, best.safetensors, last.safetensors",
    "device": "auto, cpu, cuda or cuda:N",
}

# Fields --resume may change: they do not change what the remaining steps compute, or they
# are checked where they could (batch_size/accum: the global batch must stay the same). The
# schedule's length may change on purpose (the lr then decays over the new length); all are
# listed when they differ. Any other difference refuses to resume.
RESUME_SAFE = {"iters", "epochs", "stage2_iters", "eval_interval", "log_interval",
               "save_minutes", "workers", "data", "out", "device", "val_split", "eval_size",
               "grad_checkpointing", "batch_size", "accum", "global_batch", "pretrained"}
# Fields one stage never reads: a difference in them does not matter to that stage.
UNUSED_BY_STAGE = {1: {"stage2_lr_context", "stage2_lr_rest", "stage2_loss"},
                   2: {"lr", "loss"}}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TUPLES = {"crop_size": int, "eval_size": int, "scale_range": float}
_BOOLS = {"flip", "grad_checkpointing", "past_grad"}


def list_presets() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one field value from YAML/CLI."""
    if key not in FIELDS:
        raise ConfigError(f"unknown config field '{key}'; known fields: {', '.join(FIELDS)}")
    if key in _TUPLES:
        if isinstance(value, str):
            value = value.replace("x", ",").split(",")
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key} must be two numbers, got {value!r}")
        return tuple(_TUPLES[key](v) for v in value)
    if key in _BOOLS:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if key == "model_kwargs":
        if not isinstance(value, dict):
            raise ConfigError(f"model_kwargs must be a mapping, got {value!r}")
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
        raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}") from None
    return str(value)


def load_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of field: value")
    return data


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(list_presets())}")
    return path


def make_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then a preset or a YAML file, then overrides; validated."""
    values: Dict[str, Any] = {}
    if preset and config_file:
        raise ConfigError("pass --preset or --config, not both")
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
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got '{cfg.amp}'")
    for key in ("loss", "stage2_loss"):
        if getattr(cfg, key) not in LOSSES:
            raise ConfigError(f"{key} must be one of {', '.join(LOSSES)}, got "
                             f"'{getattr(cfg, key)}'")
    if cfg.iters <= 0 and cfg.epochs <= 0:
        raise ConfigError("set iters or epochs to a positive number")
    for key in ("batch_size", "accum", "eval_interval", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.save_minutes < 0:
        raise ConfigError(f"save_minutes must be >= 0 (0: off), got {cfg.save_minutes}")
    if cfg.num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {cfg.num_classes}")
    if cfg.lr <= 0 or cfg.stage2_lr_context < 0 or cfg.stage2_lr_rest <= 0:
        raise ConfigError("learning rates must be positive")
    if not 0 < cfg.ohem_thresh <= 1 or cfg.ohem_min_kept < 0:
        raise ConfigError("ohem_thresh must be in (0, 1] and ohem_min_kept >= 0")


# -- command line -------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_override_args(parser: argparse.ArgumentParser,
                      defaults: Optional[TrainConfig] = None, source: str = "") -> None:
    """One flag per field (--batch-size, --lr, --crop-size 480 480, --past-grad/--no-past-grad,
    ...) plus --set key=value, each explained (FIELD_HELP) with the value it has when not
    given: `defaults` (the dataclass's, or a preset's, named by `source`). The flags default
    to None (= not overridden)."""
    defaults = defaults or TrainConfig()
    group = parser.add_argument_group(
        "config (any field; a flag overrides the preset or --config file)",
        f"The defaults shown are {source or 'the paper recipe (preset tbn_swin_l)'}'s; "
        f"`tbn-train --preset NAME --help` shows NAME's.")
    for name in FIELDS:
        if name == "model_kwargs":
            continue  # YAML or --set model_kwargs={...}
        flag = f"--{name.replace('_', '-')}"
        text = f"{FIELD_HELP.get(name, name)} (default: {_shown(getattr(defaults, name))})"
        text = text.replace("%", "%%")
        if name in _BOOLS:
            group.add_argument(flag, dest=name, default=None, help=text,
                               action=argparse.BooleanOptionalAction)
        elif name in _TUPLES:
            group.add_argument(flag, dest=name, default=None, nargs=2, metavar=("A", "B"),
                               help=text)
        else:
            kind = type(FIELDS[name].default)
            metavar = {int: "N", float: "X"}.get(kind, name.upper())
            group.add_argument(flag, dest=name, default=None, metavar=metavar, help=text)
    group.add_argument("--set", dest="set_values", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="any field, the value parsed as YAML (e.g. model_kwargs={...})")


def resume_changes(saved: Dict[str, Any], cfg: TrainConfig,
                   stage: int) -> Tuple[List[str], List[str]]:
    """The differences `field old -> new` between the config a stage was trained with and
    `cfg`, split into (safe to resume with, changes the results). Fields the saved config
    lacks (an older version) count as their defaults."""
    safe: List[str] = []
    unsafe: List[str] = []
    now = cfg.to_dict()
    for name in FIELDS:
        if name in UNUSED_BY_STAGE.get(stage, ()):
            continue
        old = saved.get(name, TrainConfig().to_dict()[name])
        if isinstance(old, tuple):
            old = list(old)
        if old == now[name]:
            continue
        (safe if name in RESUME_SAFE else unsafe).append(
            f"{name} {_shown(old)} -> {_shown(now[name])}")
    return safe, unsafe


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in args.set_values:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = yaml.safe_load(value) if isinstance(value, str) else value
    return out
