"""SA2VP (spatially aligned-and-adapted visual prompts) on frozen timm ViT backbones.

* :class:`SA2VP` - the model; :class:`SA2VPConfig` - its hyper-parameters (variants ``paper`` and
  ``official-acc``).
* :class:`SA2VPSwin` / :class:`SA2VPSwinConfig` - the same method on timm Swin Transformers
  (:func:`is_swin_backbone` tells the two backbone families apart).
* :func:`save_checkpoint` / :func:`load_checkpoint` - our safetensors checkpoints.
* :func:`load_official_checkpoint` - the authors' training checkpoints (see :mod:`sa2vp.convert`).
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import VARIANTS, SA2VPConfig
from .convert import load_official_checkpoint
from .model import SA2VP, SA2VPOutput
from .swin import SA2VPSwin, SA2VPSwinConfig, is_swin_backbone
from .weights import build_backbone, load_backbone_weights

__all__ = [
    "SA2VP",
    "SA2VPConfig",
    "SA2VPOutput",
    "SA2VPSwin",
    "SA2VPSwinConfig",
    "VARIANTS",
    "build_backbone",
    "is_swin_backbone",
    "load_backbone_weights",
    "load_checkpoint",
    "load_official_checkpoint",
    "save_checkpoint",
]
