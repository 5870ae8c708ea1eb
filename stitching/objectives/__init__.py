"""Stitching objectives: pure losses (:mod:`.losses`) and their LightningModules."""

from stitching.objectives.losses import (
    fula_loss,
    fula_weights,
    hint_loss,
    relative_error,
    slm_loss,
    tlm_loss,
)
from stitching.objectives.modules import OBJECTIVES, StitchedNetwork, StitchingModule, objective_module

__all__ = [
    "OBJECTIVES",
    "StitchedNetwork",
    "StitchingModule",
    "fula_loss",
    "fula_weights",
    "hint_loss",
    "objective_module",
    "relative_error",
    "slm_loss",
    "tlm_loss",
]
