"""A trained stitched network saved, and rebuilt exactly from the two given models.

What a file holds is what differs from the given front and end: the stitch (its module, with
its kind, projection and weights), the front and end copies' buffers that stitching changed
(BatchNorm running statistics, with ``update_bn``), the cut points and ``update_bn``, the
SHA-256 of each given model's tensors and any provenance the caller adds. The frozen weights
themselves are not copied: :func:`load` takes the same two models and refuses, in one line,
a model whose tensors are not the ones the stitch was trained with.

    result = stitching.stitch(front, end, 3, 5, train=...)
    result.save("stitched.pt")
    network = stitching.load("stitched.pt", front, end)   # equals result.network exactly
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from stitching.engine import StitchedNetwork
from stitching.errors import StitchingError
from stitching.models import AdaptedModel, CuttableModel, ImageInputs, adapt, as_cuttable, cut, cut_at
from stitching.runtime import tensors_digest

FORMAT = "stitching.network/1"


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state (names, dtypes, shapes and values); kept
    for the same tensors while none of them is changed in place (a grid saves every cell)."""
    state = sorted(model.state_dict().items())
    key = (id(model), tuple((name, t.data_ptr(), t._version) for name, t in state))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS.clear()  # one model pair at a time is enough
        _FINGERPRINTS[key] = tensors_digest(state)
    return _FINGERPRINTS[key]


def _changed(copied: nn.Module, given: nn.Module) -> dict[str, torch.Tensor]:
    """The state of ``copied`` that differs from ``given``'s (what stitching changed)."""
    original = given.state_dict()
    return {name: tensor.detach().cpu().clone() for name, tensor in copied.state_dict().items()
            if name not in original or original[name].shape != tensor.shape
            or not torch.equal(original[name].detach().cpu(), tensor.detach().cpu())}


def save(path: str | Path, network: StitchedNetwork, front: nn.Module, end: nn.Module,
         provenance: dict | None = None) -> Path:
    """Write ``network`` (trained between the given ``front`` and ``end``) to ``path``."""
    front, end = as_cuttable(front), as_cuttable(end)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StitchingError(f"cannot write {path} ({err.strerror or err}); choose a writable path") from None
    stitch = copy.deepcopy(network.stitch).cpu()
    payload = {
        "format": FORMAT,
        "front_layer": network.front.point.index, "end_layer": network.end.point.index,
        "front_layer_name": network.front.point.name, "end_layer_name": network.end.point.name,
        "update_bn": network.update_bn,
        "stitch": stitch,
        "changed": {"front": _changed(network.front.model, front), "end": _changed(network.end.model, end)},
        "sha256": {"front": fingerprint(front), "end": fingerprint(end)},
        "recipe": {"front": _recipe(front), "end": _recipe(end)},
        "provenance": provenance or {},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _recipe(model: CuttableModel) -> dict | None:
    """How the given model was made cuttable: its input convention and the modules it was cut at
    (a language model: whether it was cut between sub-layers)."""
    if getattr(model, "sublayers", False):
        return {"sublayers": True}
    if not isinstance(model, AdaptedModel):
        return None
    return {"inputs": model.input_spec.record(), "cut_at": list(getattr(model, "module_cuts", ()) or []) or None}


def _rebuilt(model: nn.Module, recipe: dict | None) -> CuttableModel:
    """The given model made cuttable as it was when saved (convention, named-module cuts)."""
    if recipe is None:
        return as_cuttable(model)
    if recipe.get("sublayers"):
        return as_cuttable(model).with_sublayers()
    raw = model.model if isinstance(model, AdaptedModel) else model
    given = recipe["inputs"]
    spec = ImageInputs(given["channels"], tuple(given["size"]) if given["size"] is not None else None,
                       tuple(given["mean"]), tuple(given["std"]), given["origin"])
    return cut_at(raw, recipe["cut_at"], spec) if recipe["cut_at"] else adapt(raw, spec)


def read(path: str | Path) -> dict:
    """The saved payload (checked to be a saved stitched network)."""
    path = Path(path)
    if not path.is_file():
        raise StitchingError(f"no saved stitched network at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file, truncated
        raise StitchingError(f"{path} cannot be read as a saved stitched network ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StitchingError(f"{path} is not a saved stitched network (format {FORMAT}); a run folder's stitch.pt holds "
                             f"the stitch's weights alone, network.pt the whole network")
    return payload


def load(path: str | Path, front: nn.Module, end: nn.Module) -> StitchedNetwork:
    """The stitched network saved at ``path``, rebuilt on copies of the given ``front`` and
    ``end`` (which stay untouched), in eval mode."""
    payload = read(path)
    recipes = payload.get("recipe", {})
    sides = {"front": _rebuilt(front, recipes.get("front")), "end": _rebuilt(end, recipes.get("end"))}
    for side, model in sides.items():
        if fingerprint(model) != payload["sha256"][side]:
            raise StitchingError(f"the {side} model given is not the one {path} was trained with (its weights differ); "
                                 f"pass that same {side} model (SHA-256 {payload['sha256'][side][:12]}…)")
    copies = {side: copy.deepcopy(model) for side, model in sides.items()}
    for side, model in copies.items():
        missing = set(payload["changed"][side]) - set(model.state_dict())
        if missing:
            raise StitchingError(f"{path}: the {side} model has no {sorted(missing)[0]}; pass the model it was trained with")
        model.load_state_dict(payload["changed"][side], strict=False)
    network = StitchedNetwork(cut(copies["front"], payload["front_layer"]).head, payload["stitch"],
                              cut(copies["end"], payload["end_layer"]).tail, update_bn=payload["update_bn"])
    return network.eval()
