"""Typed settings of the stitch, and the rules that check them (shared by the command line and
the Python API, so both refuse the same values with the same line)."""

from __future__ import annotations

from dataclasses import dataclass

from stitching.errors import StitchingError
from stitching.stitch_layers import STITCH_KINDS

CLASS_TOKEN = ("shared", "separate")
#: where training starts: the DM solution (the papers), the identity map, or a random map
INITS = ("dm", "identity", "random")


@dataclass(frozen=True)
class StitchSettings:
    """How the stitch is made, initialised and trained (``front_layer``/``end_layer``: the
    single run's cell; a grid's cells are given apart)."""

    front_layer: int | str = 5
    end_layer: int | str = 5
    dm_samples: int = 100
    update_bn: bool = True
    class_token: str = "shared"
    lr: float | None = None  # None: default_lr()
    weight_decay: float = 1e-4
    init: str = "dm"
    kind: str = "affine"
    rank: int | None = None
    hidden: int | None = None
    front_rank: int | None = None
    #: DM only: after the closed-form fit, one epoch of the training data through the stitched
    #: network without gradients, so front and end BatchNorm running statistics follow it
    dm_bn_pass: bool = False


#: the stitch's Adam learning rate in the FuLA paper, for every objective
PAPER_LR = 1e-3
#: Hint's and FuLA's between language models (see :func:`default_lr`)
LANGUAGE_MATCHING_LR = 1e-4


def default_lr(objective: str, language: bool) -> float:
    """The stitch's learning rate when none is given (``stitch.lr: null``).

    The paper's 1e-3 for every objective between image models, and for TLM and SLM between
    language models; 1e-4 for Hint and FuLA between language models. Measured on the packaged
    all-MiniLM-L6-v2 (one epoch, 512 sequences, cells 3→4, 4→3, 2→5): at 1e-3 both end 0.03–0.05
    relative error *worse* than their own DM start in every cell, at 1e-4 within 0.001 of it
    (``docs/language-models.md``)."""
    return LANGUAGE_MATCHING_LR if language and objective in ("hint", "fula") else PAPER_LR


def check_bn_pass(dm_bn_pass: bool, objective: str, update_bn: bool) -> None:
    """One line when the DM running-statistics pass is asked where it cannot apply."""
    if dm_bn_pass and objective != "dm":
        raise StitchingError(f"stitch.dm_bn_pass=true applies to objective dm only (a trained {objective} stitch's "
                             f"BatchNorm statistics follow its data while it trains, with stitch.update_bn=true)")
    if dm_bn_pass and not update_bn:
        raise StitchingError("stitch.dm_bn_pass=true updates BatchNorm running statistics and stitch.update_bn=false "
                             "keeps them; choose one")


def check_init(init: str, objective: str) -> None:
    """One line for an unknown initialisation, or for DM (whose initialisation is its answer) started elsewhere."""
    if init not in INITS:
        raise StitchingError(f"unknown stitch.init '{init}'; choose one of {', '.join(INITS)}")
    if objective == "dm" and init != "dm":
        raise StitchingError(f"objective dm is the DM solution itself; stitch.init={init} applies to the trained "
                             f"objectives (hint, fula, slm, tlm)")


def check_class_token(class_token: str) -> None:
    if class_token not in CLASS_TOKEN:
        raise StitchingError(f"unknown stitch.class_token '{class_token}'; choose shared or separate")


def check_capacity(kind: str, rank: int | None, front_rank: int | None = None,
                   channels: tuple[int, int] | None = None) -> None:
    """One line for an unknown stitch kind, a low-rank stitch without a rank, or (once the cut
    points' ``channels`` (in, out) are known) a rank the activations do not have."""
    if kind not in STITCH_KINDS:
        raise StitchingError(f"unknown stitch.kind '{kind}'; choose one of {', '.join(STITCH_KINDS)}")
    if kind == "low_rank" and rank is None:
        raise StitchingError("stitch.kind=low_rank needs stitch.rank (the channels the map passes through)")
    if channels is None:
        return
    if kind == "low_rank" and rank > min(channels):
        raise StitchingError(f"stitch.rank={rank} exceeds min({channels[0]}, {channels[1]}) channels of this pair of "
                             f"cut points; give a smaller rank (at full rank use stitch.kind=affine)")
    if front_rank is not None and front_rank > channels[0]:
        raise StitchingError(f"stitch.front_rank={front_rank} exceeds the front's {channels[0]} channels at this cut "
                             f"point; give at most {channels[0]} (or null for no truncation)")
