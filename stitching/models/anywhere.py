"""Cut any image network at any named module.

The network is traced by ``torch.fx`` with the named modules kept whole, and the graph is split
at them: the first piece runs the inputs to the first module's output, each next piece resumes
from one module's output and runs to the next, the last one to the logits. A piece may read
nothing but the output it resumes from: where anything after a module also reads an earlier
value (a residual connection around it, the input itself), that module's output is not the only
path onward, stitching there would leave a second path unstitched, and the cut is refused in one
line. Every piece is a :class:`~stitching.models.adapters.Step`, so the result is an ordinary
:class:`~stitching.models.adapters.AdaptedModel`: the stitch, DM, the objectives, save/load and
the similarity indices read it like any other.

Which dimension holds the channels is measured, not assumed: the network runs at two input
sizes, and the dimension that stays put while the others follow the image is the channels'.
Channels-last maps (Swin, MambaOut) and anything else the contract cannot read are refused.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import fx, nn

from stitching.errors import StitchingError
from stitching.models.adapters import AdaptedModel, Step, _library_name, adapt, base_inputs, family, read_inputs, with_inputs
from stitching.models.cutting import CuttableModel, cut_point_names
from stitching.models.inputs import ImageInputs, InputTransform
from stitching.models.layout import CONV, Layout

__all__ = ["cut_at", "cuttable", "named_cut_points"]


class _Tracer(fx.Tracer):
    """Keeps the cut modules (and what the model's library cannot trace through) whole."""

    def __init__(self, leaves: set[str], opaque: tuple[type, ...], functions: tuple):
        super().__init__(autowrap_functions=functions)
        self.leaves, self.opaque = leaves, opaque

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name in self.leaves or (bool(self.opaque) and isinstance(module, self.opaque)) or \
            super().is_leaf_module(module, name)


def _trace(model: nn.Module, leaves: list[str]) -> fx.Graph:
    opaque, functions = (), ()
    if type(model).__module__.startswith("timm."):
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules

        opaque, functions = tuple(get_notrace_modules()), tuple(get_notrace_functions())
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    try:
        return _Tracer(set(leaves), opaque, functions).trace(model, concrete_args=fixed or None)
    except Exception as err:  # data-dependent control flow and the like
        raise StitchingError(f"cannot cut {type(model).__name__} at a named module: torch.fx cannot trace it "
                             f"({str(err).splitlines()[0][:160]}); cut at its block boundaries "
                             f"(stitching.cut_points) or write it against stitching.models.CuttableModel") from None


def _piece(graph: fx.Graph, start: fx.Node, stop: fx.Node) -> fx.Graph | None:
    """The nodes ``stop`` needs, computed from ``start`` alone (``None`` where it needs more)."""
    needed, stack = set(), [stop]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is start:
            continue
        if node.op == "placeholder":
            return None
        stack.extend(node.all_input_nodes)
    piece = fx.Graph()
    env = {start: piece.placeholder("x")}
    for node in graph.nodes:
        if node in needed and node is not start:
            env[node] = piece.node_copy(node, lambda n: env[n])
    piece.output(env[stop])
    return piece


class _Runner:
    """Runs one graph piece on whichever copy of the model it is given (one ``GraphModule`` per
    model object and device, made on first use), so deep copies run on their own modules."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        first = next(model.parameters(), None)  # moved or cast: the module's tensors are new ones
        stamp = (first.device, first.dtype) if first is not None else None
        made = self.built.get(model)
        if made is None or made[1] != stamp:
            made = (fx.GraphModule(model, self.graph), stamp)
            self.built[model] = made
        return made[0](x)

    def __deepcopy__(self, memo):  # the graph is never changed; copies share it
        return self


def _channels_dim(small: torch.Size, wide: torch.Size) -> int | None:
    """The one dimension that keeps its size when the input grows (``None``: unclear)."""
    if len(small) != len(wide):
        return None
    kept = [d for d in range(1, len(small)) if small[d] == wide[d]]
    grown = [d for d in range(1, len(small)) if small[d] != wide[d]]
    return kept[0] if len(kept) == 1 and grown else None


def _layout(model: nn.Module, name: str, small: torch.Size, wide: torch.Size | None) -> Layout:
    shape = "×".join(map(str, small[1:]))
    where = f"the output of '{name}' ({shape} per image)"
    if len(small) == 4:
        kept = _channels_dim(small, wide) if wide is not None else (1 if small[1] not in (small[2], small[3]) else None)
        if kept == 1:
            return CONV
        if kept == 3:
            raise StitchingError(f"{where} is channels-last [N, H, W, C]; stitching reads maps as [N, C, H, W]: cut "
                                 f"at a module whose output is channels-first")
        raise StitchingError(f"cannot tell which dimension of {where} holds the channels; cut at a block boundary")
    if len(small) == 3:
        if wide is not None and _channels_dim(small, wide) == 1:
            raise StitchingError(f"{where} is [N, C, L] (channels before positions); stitching reads token sequences "
                                 f"as [N, T, D]")
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
        pool = "first" if getattr(model, "global_pool", None) == "token" else "mean"
        tokens = small[1] - prefix
        return Layout("tokens", prefix_tokens=prefix,
                      grid=grid if len(grid) == 2 and grid[0] * grid[1] == tokens else None, pool=pool)
    raise StitchingError(f"{where} is not a map [N, C, H, W] or a token sequence [N, T, D]: a stitch cannot be put "
                         f"there (a cut after pooling or at the classifier has nothing left to align)")


def named_cut_points(model: nn.Module) -> list[str]:
    """The names a model's modules go by (what :func:`cut_at` takes), in registration order."""
    return [name for name, _ in model.named_modules() if name]


def cut_at(model: nn.Module, names: list[str] | str, input_spec: ImageInputs | None = None,
           library: str | None = None) -> AdaptedModel:
    """``model`` cut at the modules ``names``, as a cuttable model whose cut points are those
    modules, numbered in forward order.

    Args:
        model: any image classifier (timm, torchvision or your own ``nn.Module``) that
            ``torch.fx`` can trace; never changed.
        names: module names, e.g. ``"stages.2"`` or ``["layer2", "layer3.1"]``.
        input_spec: the model's input convention; default: a timm model's pretrained config,
            torchvision's ImageNet transforms, else images in [0, 1] as they are.
        library: for records (default: the model's package).
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise StitchingError("cut_at needs at least one module name")
    known = dict(model.named_modules())
    for name in names:
        if name not in known or not name:
            close = [n for n in known if n and (n.startswith(name) or name.startswith(n))][:6]
            raise StitchingError(f"{type(model).__name__} has no module '{name}'"
                                 + (f"; near it: {', '.join(close)}" if close else "")
                                 + "; stitching.models.named_cut_points(model) lists them")
    if len(set(names)) != len(names):
        raise StitchingError(f"a cut point is named twice in {names}")
    library = library or type(model).__module__.split(".")[0]
    input_spec = input_spec or base_inputs(model)
    graph = _trace(model, names)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"][:1]  # the images; fixed keyword arguments follow
    calls = {}
    for node in nodes:
        if node.op == "call_module" and node.target in names:
            calls.setdefault(node.target, []).append(node)
    order = []
    for name in names:
        found = calls.get(name, [])
        if len(found) != 1:
            raise StitchingError(f"'{name}' runs {len(found)} times in {type(model).__name__}'s forward pass"
                                 + (" (it lies inside a module the tracer keeps whole)" if not found else "")
                                 + "; a cut point is a module that runs once")
        order.append((nodes.index(found[0]), name, found[0]))
    order.sort(key=lambda item: item[0])
    names = [name for _, name, _ in order]
    output = next(n for n in nodes if n.op == "output").args[0]
    if len(inputs) != 1 or not isinstance(output, fx.Node):
        raise StitchingError(f"{type(model).__name__} takes {len(inputs)} inputs or returns several outputs; "
                             "cut_at reads one image tensor in and one logits tensor out")
    bounds = [inputs[0], *(node for _, _, node in order), output]
    steps = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = _piece(graph, start, stop)
        if piece is None:
            what = f"after '{names[i - 1]}'" if i else "from the inputs"
            until = f"'{names[i]}'" if i < len(names) else "the output"
            raise StitchingError(f"{type(model).__name__} cannot be cut at '{names[i - 1] if i else names[0]}': the "
                                 f"computation {what} to {until} also reads an earlier value (a residual connection "
                                 f"around it), so its output is not the only path onward; cut at the module that "
                                 f"contains it (e.g. the whole block)")
        steps.append(Step(_Runner(piece), names[i] if i < len(names) else "head"))
    layouts, classes = _probe(model, steps, input_spec, names)
    cuts = [(i, name, layout) for i, (name, layout) in enumerate(zip(names, layouts))]
    adapted = AdaptedModel(model, steps, cuts, input_spec, classes, library, _library_name(model, library))
    adapted.module_cuts = tuple(names)  # how to cut it again (saving.load)
    return adapted


def _named(layers, model: nn.Module) -> list[str]:
    """The layers given by name: strings that name a module, or that cannot be numbers."""
    modules = dict(model.named_modules())
    return [layer for layer in layers
            if isinstance(layer, str) and (layer in modules or not layer.lstrip("-").isdigit())]


def cuttable(model: nn.Module, layers=(), inputs: dict | ImageInputs | None = None, side: str = "model",
             setting: str | None = None) -> CuttableModel:
    """``model`` ready to be cut at ``layers``, reading its images by ``inputs`` (see
    :func:`~stitching.models.adapters.with_inputs`).

    A model of a family the block adapters know, cut at its block boundaries, is adapted as
    usual; where a layer names a module that is no cut point of it, or the family is not known,
    the model is cut at the named modules (:func:`cut_at`)."""
    from stitching.models.language import LanguageModel, is_language_model

    raw = model.model if isinstance(model, AdaptedModel) else model
    if (isinstance(model, CuttableModel) and not isinstance(model, AdaptedModel)) or is_language_model(raw):
        made = with_inputs(model, inputs, side, setting)
        if isinstance(made, LanguageModel) and any(made.sublayer_name(layer) for layer in layers):
            if any(not isinstance(layer, str) or layer.lstrip("-").isdigit() for layer in layers):
                raise StitchingError(f"layers {list(layers)} mix numbers with attention/MLP module names; cutting "
                                     f"between sub-layers numbers the cut points anew, so give every layer by name")
            return made.with_sublayers()
        return made
    names = _named(layers, raw)
    if family(raw) is not None:
        standard = with_inputs(model, inputs, side, setting)
        known, modules = cut_point_names(standard), dict(raw.named_modules())
        if all(name in known or name not in modules for name in names):
            return standard  # block boundaries (an unknown name is refused there, listing them)
        if len(names) != len(layers):  # numbers would count the new cut points, not these
            raise StitchingError(f"layers {list(layers)} mix numbers with module names; cutting at a named module "
                                 f"numbers the cut points anew, so give every layer by name")
        return cut_at(raw, names, standard.input_spec)
    if isinstance(model, AdaptedModel) and all(name in cut_point_names(model) for name in names) and inputs is None:
        return model  # already cut at these modules
    if not names or len(names) != len(layers):
        adapt(raw)  # a layer by number needs a family the adapters know: one line says how else
    return cut_at(raw, names, read_inputs(model, inputs, side, setting))


def _probe_images(spec: ImageInputs, wider: bool) -> torch.Tensor:
    height, width = spec.size if spec.size is not None else (64, 64)
    scale = 2 if wider else 1
    return torch.rand(2, spec.channels, height * scale, width * scale, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _activations(model: nn.Module, steps: list[Step], spec: ImageInputs, images: torch.Tensor) -> list[torch.Tensor]:
    """Every piece's output for ``images`` taken at their own size (normalised, never resized)."""
    was = model.training
    model.eval()
    try:
        as_given = ImageInputs(spec.channels, None, spec.mean, spec.std, spec.origin)
        x, out = InputTransform(as_given)(images), []
        for step in steps:
            x = step(model, x)
            out.append(x)
        return out
    finally:
        model.train(was)


def _probe(model: nn.Module, steps: list[Step], spec: ImageInputs, names: list[str]) -> tuple[list[Layout], int]:
    """Each cut point's layout and the number of classes, from two small forward passes."""
    small = _activations(model, steps, spec, _probe_images(spec, wider=False))
    try:  # at twice the size, the channels are the dimension that stays put
        wide = _activations(model, steps, spec, _probe_images(spec, wider=True))
    except Exception:  # a model that reads one input size only: judged on the square input alone
        wide = None
    logits = small[-1]
    if logits.dim() != 2:
        raise StitchingError(f"{type(model).__name__} returns {tuple(logits.shape[1:])} per image, not class logits; "
                             "stitching needs a classifier")
    layouts = [_layout(model, name, a.shape, wide[i].shape if wide is not None else None)
               for i, (name, a) in enumerate(zip(names, small))]
    return layouts, int(logits.shape[1])
