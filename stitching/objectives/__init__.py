"""Stitching objectives: pure losses (:mod:`.losses`) and their LightningModules."""

from stitching.objectives.losses import (
    fula_loss,
    fula_weights,
    hint_loss,
    relative_error,
    slm_loss,
    tlm_loss,
)
from stitching.objectives.modules import OBJECTIVES, StitchedNetwork, StitchingModule

__all__ = [
    "OBJECTIVES",
    "StitchedNetwork",
    "StitchingModule",
    "fula_loss",
    "fula_weights",
    "hint_loss",
    "relative_error",
    "slm_loss",
    "tlm_loss",
]
