"""Networks from other libraries made cuttable: timm and torchvision, by name or as given.

An adapter wraps the library's own model (``self.model``, weights untouched) and runs it
as a sequence of steps that call that model's own modules in the order its ``forward``
does, so ``tail(*head(x))`` equals the library's forward exactly. Supported families:

* timm ``ResNet`` (and ResNet-like: ``conv1 … layer4``), ``ConvNeXt``, ``VisionTransformer``
  (DeiT, class and register tokens, any pooling);
* torchvision ``ResNet`` and ``VisionTransformer`` (``vit_b_16`` …).

Cut points are the stem and every block, named after the library's own modules
(``maxpool``, ``layer2.1``; ``stem``, ``stages.1.blocks.0``; ``blocks.3``;
``encoder.layers.encoder_layer_3``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
from torch import nn

from stitching.errors import StitchingError
from stitching.models.cutting import Context, CuttableModel, CutPoint
from stitching.models.inputs import ImageInputs, InputTransform
from stitching.models.layout import CONV, Layout

LIBRARIES = ("timm", "torchvision")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Step:
    """One block of an adapted model: a function of (wrapped model, activation).

    Steps reach modules through the model they are given, never by holding them, so a
    deep copy of the adapter runs on the copied modules.
    """

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], name: str):
        self.fn, self.name = fn, name

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.fn(model, x)


def _module(path: str) -> Step:
    return Step(lambda model, x: model.get_submodule(path)(x), path)


def _add_blocks(steps: list[Step], cuts: list, paths: list[str], layout: Layout) -> None:
    """Append one step per module path, each a cut point named after it."""
    for path in paths:
        steps.append(_module(path))
        cuts.append((len(steps) - 1, path, layout))


class AdaptedModel(CuttableModel):
    """A library model run as ``steps``; images in [0, 1] go through its :class:`InputTransform`.

    Args:
        model: the library's model (kept as ``self.model``; its state dict is the library's).
        steps: the blocks in forward order; the last returns the logits.
        cuts: ``(step position, name, layout)`` of every cut point.
        input_spec: the model's input convention.
        library, name: where the architecture comes from, for records and messages.
    """

    def __init__(self, model: nn.Module, steps: list[Step], cuts: list[tuple[int, str, Layout]],
                 input_spec: ImageInputs, num_classes: int, library: str, name: str):
        super().__init__()
        self.model = model
        self.transform = InputTransform(input_spec)
        self.steps = steps
        self.cut_points = tuple(CutPoint(i, n, p, layout) for i, (p, n, layout) in enumerate(cuts, 1))
        self.input_spec = input_spec
        self.num_classes = num_classes
        self.library, self.name = library, name
        self.training = model.training  # the wrapper starts in the model's mode (its children keep theirs)

    @property
    def blocks(self) -> list[Step]:
        return self.steps

    def embed(self, inputs, context: Context) -> torch.Tensor:
        return self.transform(inputs)

    def run_block(self, position: int, x: torch.Tensor, context: Context) -> torch.Tensor:
        return self.steps[position](self.model, x)


# -- families ------------------------------------------------------------------------------
def _resnet(model: nn.Module, spec: ImageInputs, library: str, name: str) -> AdaptedModel:
    """``conv1 → bn1 → act → maxpool → layer1..4 → pool → fc`` (timm and torchvision alike)."""
    act = "act1" if hasattr(model, "act1") else "relu"

    def stem(m, x):
        return m.maxpool(getattr(m, act)(m.bn1(m.conv1(x))))

    if library == "timm":
        def head(m, x):
            return m.forward_head(x)
    else:
        def head(m, x):
            return m.fc(torch.flatten(m.avgpool(x), 1))

    steps, cuts = [Step(stem, "stem")], [(0, "maxpool", CONV)]
    _add_blocks(steps, cuts, [f"layer{stage}.{b}" for stage in range(1, 5)
                              for b in range(len(getattr(model, f"layer{stage}")))], CONV)
    steps.append(Step(head, "head"))
    return AdaptedModel(model, steps, cuts, spec, _classes(model), library, name)


def _convnext(model: nn.Module, spec: ImageInputs, name: str) -> AdaptedModel:
    steps, cuts = [_module("stem")], [(0, "stem", CONV)]
    for s, stage in enumerate(model.stages):
        for b in range(len(stage.blocks)):
            if b == 0:  # a stage's downsampling runs before its first block
                steps.append(Step(lambda m, x, s=s: m.stages[s].blocks[0](m.stages[s].downsample(x)),
                                  f"stages.{s}.blocks.0"))
            else:
                steps.append(_module(f"stages.{s}.blocks.{b}"))
            cuts.append((len(steps) - 1, f"stages.{s}.blocks.{b}", CONV))
    steps.append(Step(lambda m, x: m.forward_head(m.norm_pre(x)), "head"))
    return AdaptedModel(model, steps, cuts, spec, _classes(model), "timm", name)


def _timm_vit(model: nn.Module, spec: ImageInputs, name: str) -> AdaptedModel:
    def embed(m, x):
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    grid = tuple(model.patch_embed.grid_size) if spec.size is not None else None
    layout = Layout("tokens", prefix_tokens=int(model.num_prefix_tokens), grid=grid,
                    pool="first" if model.global_pool == "token" else "mean")
    steps, cuts = [Step(embed, "embed")], []
    _add_blocks(steps, cuts, [f"blocks.{b}" for b in range(len(model.blocks))], layout)
    steps.append(Step(lambda m, x: m.forward_head(m.norm(x)), "head"))
    return AdaptedModel(model, steps, cuts, spec, _classes(model), "timm", name)


def _torchvision_vit(model: nn.Module, spec: ImageInputs, name: str) -> AdaptedModel:
    def embed(m, x):
        x = m._process_input(x)
        x = torch.cat([m.class_token.expand(len(x), -1, -1), x], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def head(m, x):
        return m.heads(m.encoder.ln(x)[:, 0])

    side = model.image_size // model.patch_size
    layout = Layout("tokens", prefix_tokens=1, grid=(side, side), pool="first")
    steps, cuts = [Step(embed, "embed")], []
    _add_blocks(steps, cuts, [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()], layout)
    steps.append(Step(head, "head"))
    return AdaptedModel(model, steps, cuts, spec, _classes(model), "torchvision", name)


def _classes(model: nn.Module) -> int:
    if hasattr(model, "num_classes") and isinstance(model.num_classes, int):
        return model.num_classes
    for candidate in ("fc", "head", "heads.head", "head.fc"):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module.out_features
    raise StitchingError(f"cannot tell how many classes {type(model).__name__} predicts")


# -- which family a model belongs to ------------------------------------------------------
def family(model: nn.Module) -> tuple[str, str] | None:
    """``(library, family)`` of a model an adapter supports, else ``None``."""
    cls = type(model)
    module = cls.__module__
    if module.startswith("timm."):
        if all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool", "layer4", "forward_head")):
            return "timm", "resnet"
        if all(hasattr(model, a) for a in ("stem", "stages", "norm_pre", "forward_head")) and \
                all(hasattr(s, "downsample") and hasattr(s, "blocks") for s in model.stages):
            return "timm", "convnext"
        if all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head",
                                           "num_prefix_tokens")):
            return "timm", "vit"
    if module.startswith("torchvision."):
        if all(hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer4", "avgpool", "fc")):
            return "torchvision", "resnet"
        if all(hasattr(model, a) for a in ("_process_input", "class_token", "encoder", "heads")):
            return "torchvision", "vit"
    return None


SUPPORTED = ("timm ResNet, ConvNeXt and VisionTransformer (DeiT, register tokens) families; "
             "torchvision ResNet and VisionTransformer")


def adapt(model: nn.Module, input_spec: ImageInputs | None = None, name: str | None = None) -> AdaptedModel:
    """Wrap a timm or torchvision model; its input convention comes from its pretrained
    config unless ``input_spec`` says otherwise."""
    found = family(model)
    if found is None:
        raise StitchingError(f"cannot cut a {type(model).__module__}.{type(model).__name__} at its blocks; stitching "
                             f"cuts {SUPPORTED} there, any model at a named module (give the module's name as the "
                             f"layer, e.g. 'stages.2'; stitching.models.named_cut_points lists them), or a model "
                             f"written against stitching.models.CuttableModel")
    library, kind = found
    spec = input_spec or default_input_spec(model, library)
    name = name or _library_name(model, library)
    if kind == "resnet":
        return _resnet(model, spec, library, name)
    if kind == "convnext":
        return _convnext(model, spec, name)
    return _timm_vit(model, spec, name) if library == "timm" else _torchvision_vit(model, spec, name)


def library_model(model: nn.Module, input_spec: ImageInputs | None = None, name: str | None = None) -> AdaptedModel:
    """A timm/torchvision model as :func:`adapt` makes it when its family is known; otherwise
    the whole model with no cut points of its own, to be cut at named modules
    (:func:`stitching.models.cuttable`): it trains, tests and is stored like any other."""
    if family(model) is not None:
        return adapt(model, input_spec, name)
    library = type(model).__module__.split(".")[0]
    spec = input_spec or default_input_spec(model, library)
    classes = getattr(model, "num_classes", None) or _num_outputs(model)
    return AdaptedModel(model, [Step(lambda m, x: m(x), "model")], [], spec, classes, library,
                        name or _library_name(model, library))


def _num_outputs(model: nn.Module) -> int | None:
    """The width of the last linear layer (a classifier's classes), if there is one."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else None


def _library_name(model: nn.Module, library: str) -> str:
    if library == "timm":
        return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__.lower()
    return type(model).__name__.lower()


def default_input_spec(model: nn.Module, library: str) -> ImageInputs:
    """Input size, channels and normalisation from the model's pretrained config."""
    if library == "timm":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        fixed = hasattr(model, "patch_embed")  # a ViT's positions fix its size; CNNs read any
        size = tuple(model.patch_embed.img_size) if fixed and model.patch_embed.img_size else (height, width)
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        in_chans = _first_conv_channels(model)
        if in_chans != channels:
            channels, mean, std = in_chans, _fit(mean, in_chans), _fit(std, in_chans)
        return ImageInputs(channels, tuple(size), mean, std, origin="timm pretrained config")
    size = model.image_size if hasattr(model, "image_size") else 224
    return ImageInputs(_first_conv_channels(model), (size, size), IMAGENET_MEAN, IMAGENET_STD,
                       origin="torchvision ImageNet weights' transforms")


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _fit(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def as_cuttable(model: nn.Module) -> CuttableModel:
    """``model`` itself when it follows the contract, else its adapter (timm, torchvision,
    Hugging Face language models)."""
    if isinstance(model, CuttableModel):
        return model
    from stitching.models.language import LanguageModel, is_language_model

    if is_language_model(model):
        return LanguageModel(model)
    return adapt(model)


#: what ``front.input.*`` / ``stitch(front_inputs=…)`` may set
INPUT_KEYS = ("size", "channels", "mean", "std")


def with_inputs(model: nn.Module, inputs: dict | ImageInputs | None, side: str = "model",
                setting: str | None = None) -> CuttableModel:
    """``model`` (as :func:`as_cuttable`) reading its images by ``inputs``: an
    :class:`ImageInputs`, or a dict of any of ``size`` (an int or ``[height, width]``),
    ``channels``, ``mean`` and ``std`` (one value or one per channel) that replace the model's
    default convention (its pretrained config, or what it was adapted with). Only library
    (timm / torchvision) models take a convention; a model built here reads its training data's."""
    if inputs is None or (isinstance(inputs, dict) and all(v is None for v in inputs.values())):
        return as_cuttable(model)
    setting = setting or f"{side}_inputs"
    raw = model.model if isinstance(model, AdaptedModel) else model
    if isinstance(model, CuttableModel) and not isinstance(model, AdaptedModel):
        raise StitchingError(f"{setting} applies to timm and torchvision models; this {side} model "
                             f"({type(model).__name__}) reads the convention it was built with")
    found = family(raw)
    if found is None:
        raise StitchingError(f"{setting}: cannot cut a {type(raw).__module__}.{type(raw).__name__} at its blocks; "
                             f"stitching cuts {SUPPORTED}, or any model at a named module "
                             f"(stitching.models.cut_at)")
    spec = read_inputs(model, inputs, side, setting)
    return adapt(raw, spec, name=model.name if isinstance(model, AdaptedModel) else None)


def base_inputs(model: nn.Module) -> ImageInputs:
    """The convention a model reads by default: what it was adapted with, a timm model's pretrained
    config, torchvision's ImageNet transforms, else images in [0, 1] as they are."""
    if isinstance(model, AdaptedModel):
        return model.input_spec
    package = type(model).__module__.split(".")[0]
    if package in LIBRARIES:
        return default_input_spec(model, package)
    channels = _first_conv_channels(model)
    return ImageInputs(channels, None, (0.0,) * channels, (1.0,) * channels, origin="none: images in [0, 1] as they are")


def read_inputs(model: nn.Module, inputs: dict | ImageInputs | None, side: str = "model",
                setting: str | None = None) -> ImageInputs:
    """``inputs`` (an :class:`ImageInputs`, or a dict of any of :data:`INPUT_KEYS` over the model's
    :func:`base_inputs`) checked against the model, or one line."""
    setting = setting or f"{side}_inputs"
    raw = model.model if isinstance(model, AdaptedModel) else model
    if inputs is None:
        return base_inputs(model)
    if isinstance(inputs, ImageInputs):
        spec = inputs
    else:
        if not isinstance(inputs, dict):
            raise StitchingError(f"{setting} must be a dict of {', '.join(INPUT_KEYS)} or an ImageInputs, "
                                 f"not a {type(inputs).__name__}")
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown:
            raise StitchingError(f"{setting}: unknown key(s) {', '.join(map(str, unknown))}; give {', '.join(INPUT_KEYS)}")
        spec = _merged_inputs(base_inputs(model), {k: v for k, v in inputs.items() if v is not None}, setting,
                              _first_conv_channels(raw))
    fixed = getattr(getattr(raw, "patch_embed", None), "img_size", None) or getattr(raw, "image_size", None)
    if fixed is not None and spec.size is not None:
        fixed = (fixed, fixed) if isinstance(fixed, int) else tuple(fixed)
        if tuple(spec.size) != fixed:
            raise StitchingError(f"{setting}: size={list(spec.size)} but this {side} model's position embeddings are "
                                 f"for {list(fixed)} images; leave size unset")
    return spec


def _merged_inputs(base: ImageInputs, given: dict, setting: str, conv_channels: int) -> ImageInputs:
    def bad(key, value, what):
        return StitchingError(f"{setting}: {key}={value!r} is out of range: it must be {what}")

    channels = given.get("channels", base.channels)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels != conv_channels:
        raise bad("channels", channels, f"the {conv_channels} channel(s) the model's first layer reads")
    size = given.get("size", base.size)
    if size is not None:
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise bad("size", given.get("size"), "an integer ≥ 1 or [height, width]")
        size = tuple(size)
    values = {}
    for key, positive in (("mean", False), ("std", True)):
        value = given.get(key, getattr(base, key))
        value = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not (isinstance(value, (list, tuple)) and len(value) in (1, channels)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (v > 0 or not positive) for v in value)):
            raise bad(key, given.get(key), f"{'positive ' if positive else ''}finite number(s), one or one per channel")
        values[key] = tuple(float(v) for v in (value * channels if len(value) == 1 else value))
    origin = "given: " + ", ".join(f"{k}" for k in INPUT_KEYS if k in given) + f" ({setting}); the rest {base.origin}"
    return ImageInputs(channels, size, values["mean"], values["std"], origin=origin)


# -- building by name ---------------------------------------------------------------------


def cut_points(model: nn.Module) -> list[CutPoint]:
    """Where ``model`` can be cut: index, name and activation layout of every cut point (any
    model an adapter supports, or a :class:`~stitching.models.CuttableModel`)."""
    return list(as_cuttable(model).cut_points)

def known_names(library: str) -> list[str]:
    if library == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_name(library: str, name: str) -> None:
    """One line for a name the library does not have, with close names."""
    if library not in LIBRARIES:
        raise StitchingError(f"unknown model library '{library}'; choose one of {', '.join(LIBRARIES)}")
    if not name:
        raise StitchingError(f"model.name is required for {library} models (e.g. model.name=resnet18)")
    names = known_names(library)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see {library}'s model list"
        raise StitchingError(f"{library} has no model '{name}'{hint}")


def create(library: str, name: str, num_classes: int | None = None, in_channels: int | None = None,
           image_size: int | None = None, pretrained: bool = False) -> nn.Module:
    """The library's model by name (random weights, or the hub's when ``pretrained``)."""
    check_name(library, name)
    if library == "timm":
        import timm

        kwargs = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_chans"] = in_channels
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
            size = getattr(getattr(model, "patch_embed", None), "img_size", None)
            if image_size is not None and not pretrained and size is not None and tuple(size) != (image_size,) * 2:
                model = timm.create_model(name, img_size=image_size, **kwargs)  # a ViT's positions fix its size
            return model
        except Exception as err:
            if pretrained:
                raise StitchingError(offline_advice(library, name, err)) from None
            raise StitchingError(f"timm cannot build '{name}' with {kwargs}: {str(err).splitlines()[0]}") from None
    import torchvision

    kwargs = {}
    if num_classes is not None and not pretrained:
        kwargs["num_classes"] = num_classes
    if image_size is not None and name.startswith("vit") and not pretrained:
        kwargs["image_size"] = image_size
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except Exception as err:
        if pretrained:
            raise StitchingError(offline_advice(library, name, err)) from None
        raise StitchingError(f"torchvision cannot build '{name}' with {kwargs}: {str(err).splitlines()[0]}") from None
    if in_channels not in (None, 3):
        raise StitchingError(f"torchvision's {name} reads 3-channel images; use 3-channel data")
    return model


def offline_advice(library: str, name: str, err: BaseException) -> str:
    """Which file to fetch, and where to put it, when pretrained weights cannot be downloaded."""
    reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    if library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None)
        where = (f"model.safetensors from the Hugging Face repo {hub}" if hub
                 else getattr(cfg, "url", None) or "its weights file")
    else:
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        where = f"{weights.url} (or put it in {torch.hub.get_dir()}/checkpoints/)"
    return (f"cannot fetch pretrained {library} weights for '{name}' ({reason}); "
            f"download {where} and pass it as front.checkpoint=PATH / end.checkpoint=PATH")
