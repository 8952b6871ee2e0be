"""TBN-ViT and the variants of the paper's ablation (Table 1), behind one registry."""

from .backbones import BackboneError, TimmBackbone
from .base import VideoSegmenter, randomize_batchnorm
from .registry import build_model, list_models, register_model
from .stppm import SpatialTemporalPPM
from .tbn import TemporalBilateralNet

__all__ = ["BackboneError", "TimmBackbone", "VideoSegmenter", "randomize_batchnorm", "build_model", "list_models",
           "register_model", "SpatialTemporalPPM", "TemporalBilateralNet"]
