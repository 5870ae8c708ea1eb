"""Stitching objectives: pure losses (:mod:`.losses`) and the objectives as plain objects
(:mod:`.objective`: what each reads, and its loss); :mod:`stitching.engine` trains them."""

from stitching.objectives.losses import (
    fula_loss,
    fula_weights,
    hint_loss,
    relative_error,
    slm_loss,
    tlm_loss,
)
from stitching.objectives.objective import OBJECTIVES, Objective, make_objective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "fula_loss",
    "fula_weights",
    "hint_loss",
    "make_objective",
    "relative_error",
    "slm_loss",
    "tlm_loss",
]
