"""The stitch layers and their closed-form direct-matching (DM) solution.

Which stitch joins two cut points follows from their declared layouts
(:mod:`stitching.models.layout`): a 1×1 convolution between conv maps, a linear map on
the embedding dimension applied to every token between token sequences. Its capacity is
``kind``:

* ``affine`` — one map with bias (the papers);
* ``low_rank`` — the map factored through ``rank`` channels; DM is then reduced-rank
  regression, the best rank-``r`` affine map in least squares;
* ``mlp`` — the affine map plus a one-hidden-layer ReLU branch whose output layer starts at
  zero, so the stitch starts exactly where its affine part does (DM, identity or random).

``front_rank`` (any kind) first projects the front activation onto its top principal
directions over channels (:class:`RankProjection`), fitted on the DM samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stitching.errors import StitchingError
from stitching.models import layout as layouts
from stitching.models.layout import Layout


@torch.no_grad()
def _load_affine(layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy an ``[out, in]`` matrix and an ``[out]`` bias into a 1×1 convolution or a linear layer."""
    layer.weight.copy_(weight.reshape_as(layer.weight).to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))


STITCH_KINDS = ("affine", "low_rank", "mlp")


def _channel_map(conv: bool, c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d | nn.Linear:
    """A map on the channels: a 1×1 convolution of conv maps, a linear layer on tokens."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias) if conv else nn.Linear(c_in, c_out, bias=bias)


class RankProjection(nn.Module):
    """``x ↦ μ + (x − μ) V Vᵀ`` on the channels: the top-``r`` principal directions ``V``
    (``[C, r]``, orthonormal) of rows with mean ``μ``; applies to conv maps and token sequences."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, layout: Layout):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", basis.float())
        self.kind = layout.kind

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x = a.movedim(1, -1) if self.kind == "conv" else a
        x = self.mean + ((x - self.mean) @ self.basis) @ self.basis.T
        return x.movedim(-1, 1) if self.kind == "conv" else x


def principal_projection(rows: torch.Tensor, rank: int, layout: Layout) -> RankProjection:
    """The :class:`RankProjection` onto the top-``rank`` principal directions of ``[n, C]`` rows
    (channels as features, positions as samples), computed in float64."""
    x = rows.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    if rank > vh.shape[0]:
        raise ValueError(f"rank {rank} exceeds the {vh.shape[0]} directions {len(x)} rows of {x.shape[1]} channels have")
    return RankProjection(mean, vh[:rank].T, layout)


class _AffineStitch(nn.Module):
    """Shared by both stitches: the map's weights and capacity, the optional rank projection of
    the front, resizing to the end's spatial size, the DM fit. Subclasses name their (shared)
    output layer in ``affine``; ``down`` (low rank) and ``branch`` (MLP) are ``None`` when unused."""

    front_layout: Layout
    end_layout: Layout
    out_size: tuple[int, ...] | None
    down: nn.Module | None
    branch: nn.Sequential | None
    projection: RankProjection | None

    def _build(self, conv: bool, c_in: int, c_out: int, kind: str, rank: int | None, hidden: int | None) -> nn.Module:
        """The output layer for ``kind``; sets ``down``/``branch`` (and ``projection`` to none)."""
        if kind not in STITCH_KINDS:
            raise ValueError(f"unknown stitch kind '{kind}'; choose one of {', '.join(STITCH_KINDS)}")
        if kind == "low_rank" and (rank is None or not 1 <= rank <= min(c_in, c_out)):
            raise ValueError(f"stitch.kind=low_rank needs stitch.rank in [1, {min(c_in, c_out)}] between {c_in} and "
                             f"{c_out} channels (got {rank}); at full rank it is the affine stitch")
        self.projection = None
        self.down = _channel_map(conv, c_in, rank, bias=False) if kind == "low_rank" else None
        self.branch = None
        if kind == "mlp":
            width = hidden or c_out
            self.branch = nn.Sequential(_channel_map(conv, c_in, width), nn.ReLU(), _channel_map(conv, width, c_out))
            self._zero_branch()
        return _channel_map(conv, rank if kind == "low_rank" else c_in, c_out)

    @property
    def kind(self) -> str:
        return "low_rank" if self.down is not None else "mlp" if self.branch is not None else "affine"

    @property
    def affine(self) -> nn.Conv2d | nn.Linear:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The affine part's ``[out, in]`` matrix (the product of the factors of a low-rank stitch),
        shaped like its output layer's weight."""
        if self.down is None:
            return self.affine.weight
        up, down = self.affine.weight, self.down.weight
        product = up.reshape(up.shape[:2]) @ down.reshape(down.shape[:2])
        return product.reshape(product.shape + up.shape[2:])

    @property
    def channels(self) -> tuple[int, int]:
        """``(in, out)`` feature sizes of the map."""
        first = self.down if self.down is not None else self.affine
        return first.weight.shape[1], self.affine.weight.shape[0]

    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a ``[out, in]`` matrix and an ``[out]`` bias into the affine layer (a low-rank
        stitch keeps the best rank-r factorisation of the matrix)."""
        if self.down is None:
            _load_affine(self.affine, weight, bias)
            return
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = self.down.weight.shape[0]
        self.set_factors(vh[:r], u[:, :r] * s[:r], bias)

    @torch.no_grad()
    def set_factors(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a low-rank stitch: ``down`` ``[r, in]``, ``up`` ``[out, r]`` and the bias."""
        self.down.weight.copy_(down.reshape_as(self.down.weight).to(self.down.weight))
        _load_affine(self.affine, up, bias)

    def _zero_branch(self) -> None:
        if self.branch is not None:
            nn.init.zeros_(self.branch[-1].weight)
            nn.init.zeros_(self.branch[-1].bias)

    def resize(self, a: torch.Tensor) -> torch.Tensor:
        return layouts.resize(a, self.front_layout, self.end_layout, self.out_size)

    def prepare(self, a: torch.Tensor) -> torch.Tensor:
        """The front activation as the map reads it: rank-projected (if set), then resized."""
        return self.resize(self.projection(a) if self.projection is not None else a)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x = self.projection(a) if self.projection is not None else a
        if self._maps_before_resizing(x):
            return self.resize(self.map_positions(x))
        return self.map_positions(self.resize(x))

    def _maps_before_resizing(self, a: torch.Tensor) -> bool:
        """Whether to apply the map at the front's resolution and resize its output instead.

        Bilinear resizing mixes positions with weights that sum to one; the affine map (and a
        low-rank one) mixes channels the same way at every position: the two commute exactly, so
        the order is free and follows the cost. Upsampling a deep front (128 channels, 4×4) to
        an early end layer (16 channels, 32×32) costs 14× less this way round: the map runs on
        16 positions, not 1 024, and only its 16 output channels are resized. An MLP branch is
        not linear and keeps the order of its definition."""
        if self.branch is not None or self.out_size is None:
            return False
        grid = tuple(a.shape[-2:]) if self.front_layout.kind == "conv" else self.front_layout.grid
        return grid is not None and math.prod(grid) < math.prod(self.out_size)

    def map_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The map applied to every position (or token) of ``x``."""
        return self.apply_map(x)

    def apply_map(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine(self.down(x) if self.down is not None else x)
        return y + self.branch(x) if self.branch is not None else y

    @torch.no_grad()
    def initialise(self, kind: str) -> None:
        """Start from ``identity`` (the ``[out, in]`` identity, zero bias: the front's channels
        passed through, the peers' ``eye``; a low-rank stitch passes its first ``r`` channels) or
        ``random`` (PyTorch's default initialisation, the peers' ``rand``); ``dm`` is :meth:`fit`.
        An MLP branch always starts at zero output."""
        if kind not in ("identity", "random"):
            raise ValueError(f"unknown stitch initialisation '{kind}'")
        path = [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                and not (self.branch is not None and any(m is b for b in self.branch.modules()))]
        for layer in path:
            if kind == "random":
                layer.reset_parameters()
                continue
            out, inp = layer.weight.shape[:2]
            layer.weight.copy_(torch.eye(out, inp).reshape_as(layer.weight))
            if layer.bias is not None:
                layer.bias.zero_()
        self._zero_branch()

    @torch.no_grad()
    def fit_rows(self, front: torch.Tensor, end: torch.Tensor) -> None:
        """Least squares from ``[rows, in]`` to ``[rows, out]`` (of rank ``r`` for a low-rank stitch)."""
        if self.down is None:
            self.set_affine(*dm_solution(front, end))
        else:
            self.set_factors(*reduced_rank_solution(front, end, self.down.weight.shape[0]))

    @torch.no_grad()
    def fit(self, front: torch.Tensor, end: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Least squares from prepared front to end activations over every real position."""
        rows = layouts.as_rows(front, self.front_layout, mask)
        self.check_rows(len(rows), rows.shape[1], len(front))
        self.dm_rows = len(rows)  # recorded with the run
        self.fit_rows(rows, layouts.as_rows(end, self.end_layout, mask))

    def check_rows(self, rows: int, columns: int, samples: int, what: str = "") -> None:
        """Refuse an underdetermined DM fit in one line: fewer rows (samples × real positions)
        than unknowns per output channel (the front's channels, or its kept rank, + the bias),
        where the minimum-norm solution is one of many and not the least-squares map."""
        unknowns = (self.projection.rank if self.projection is not None else columns) + 1
        if rows < unknowns:
            per_sample = max(rows / max(samples, 1), 1e-9)
            raise StitchingError(
                f"the DM fit{what} is underdetermined: {rows} rows ({samples} samples × {rows / max(samples, 1):g} "
                f"positions) for {unknowns} unknowns per output channel; set stitch.dm_samples (dm_samples= in "
                f"Python) to at least {math.ceil(unknowns / per_sample)}, or start from stitch.init=identity|random")


class Stitch(_AffineStitch):
    """A 1×1 convolution with bias, after bilinear resizing of the front map if needed.

    Args:
        in_channels: channels of the front model's activation at cut point i.
        out_channels: channels of the end model's activation at cut point j.
        out_size: the end map's spatial size ``(H, W)``; the front map is resized to it
            (bilinear, as in Balogh & Jelasity 2025) when the sizes differ.
    """

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int] | None = None,
                 kind: str = "affine", rank: int | None = None, hidden: int | None = None):
        super().__init__()
        self.conv = self._build(True, in_channels, out_channels, kind, rank, hidden)
        self.out_size = tuple(out_size) if out_size is not None else None
        self.front_layout = self.end_layout = layouts.CONV

    @property
    def affine(self) -> nn.Conv2d:
        return self.conv


class TokenStitch(_AffineStitch):
    """A linear map on the embedding dimension, with bias, applied to every token.

    Works for any sequence length. Between vision transformers whose patch grids differ,
    the front's patch tokens are resized bilinearly on their grid first (prefix tokens kept).

    Args:
        in_channels: the front model's embedding width at cut point i.
        out_channels: the end model's embedding width at cut point j.
        front_layout, end_layout: the two cut points' token layouts.
        separate_class_token: give the class token (position 0) its own affine map; DM
            then fits it on class tokens alone instead of as one row among all tokens.
        kind, rank, hidden: the map's capacity (see the module's docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, front_layout: Layout | None = None,
                 end_layout: Layout | None = None, separate_class_token: bool = False, kind: str = "affine",
                 rank: int | None = None, hidden: int | None = None):
        super().__init__()
        self.front_layout = front_layout or Layout("tokens")
        self.end_layout = end_layout or self.front_layout
        self.out_size = tuple(self.end_layout.grid) if self.end_layout.grid is not None else None
        if separate_class_token and self.end_layout.prefix_tokens < 1:
            raise ValueError("stitch.class_token=separate needs a class token; this layout has no prefix tokens")
        if separate_class_token and kind != "affine":
            raise ValueError(f"stitch.class_token=separate works with the affine stitch, not stitch.kind={kind}")
        self.linear = self._build(False, in_channels, out_channels, kind, rank, hidden)
        self.class_linear = nn.Linear(in_channels, out_channels, bias=True) if separate_class_token else None

    def map_positions(self, a: torch.Tensor) -> torch.Tensor:
        if self.class_linear is None:
            return self.apply_map(a)
        return torch.cat([self.class_linear(a[:, :1]), self.linear(a[:, 1:])], dim=1)

    @property
    def affine(self) -> nn.Linear:
        return self.linear

    @torch.no_grad()
    def fit(self, front: torch.Tensor, end: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Least squares over every real token (with a separate class map: class tokens alone)."""
        if self.class_linear is None:
            super().fit(front, end, mask)
            return
        rest = mask[:, 1:] if mask is not None else None
        rows = layouts.as_rows(front[:, 1:], self.front_layout, rest)
        self.check_rows(len(rows), rows.shape[1], len(front))
        self.check_rows(len(front), front.shape[-1], len(front), " of the class token's own map")
        self.dm_rows = len(rows)
        self.fit_rows(rows, layouts.as_rows(end[:, 1:], self.end_layout, rest))
        _load_affine(self.class_linear, *dm_solution(front[:, 0], end[:, 0]))


def make_stitch(a_front: torch.Tensor, front_layout: Layout, a_end: torch.Tensor, end_layout: Layout,
                separate_class_token: bool = False, kind: str = "affine", rank: int | None = None,
                hidden: int | None = None) -> Stitch | TokenStitch:
    """The stitch joining activations like ``a_front`` (declared ``front_layout``) to ones like
    ``a_end``: a 1×1 convolution between conv maps, a token-wise linear map between token
    sequences (``separate_class_token``: its own map for the class token), of capacity ``kind``."""
    problem = layouts.compatible(front_layout, end_layout)
    if problem:
        raise ValueError(problem)
    c_in, c_out = layouts.channels(a_front, front_layout), layouts.channels(a_end, end_layout)
    if front_layout.kind == "conv":
        if separate_class_token:
            raise ValueError("stitch.class_token=separate applies to ViTs; convolutional maps have no class token")
        return Stitch(c_in, c_out, layouts.target_size(a_end, end_layout), kind, rank, hidden)
    return TokenStitch(c_in, c_out, front_layout, end_layout, separate_class_token, kind, rank, hidden)


def dm_solution(front: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map from front to end rows, by the pseudo-inverse, in float64.

    Args:
        front: ``[rows, C_in]`` — every spatial position (or real token) of every sample.
        end: ``[rows, C_out]``, the matching rows of the end model.

    Returns:
        ``(weight [C_out, C_in], bias [C_out])`` minimising ``Σ_r ‖W x_r + b − y_r‖²``, in
        ``front``'s dtype.
    """
    x, y = front.double(), end.double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    solution = min_norm_lstsq(x1, y)  # [C_in + 1, C_out]
    return solution[:-1].T.to(front.dtype), solution[-1].to(front.dtype)


def min_norm_lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``pinv(x) @ y``: the minimum-norm least-squares solution, rank-deficient ``x`` included.

    On a CPU by LAPACK's ``gelsd`` (QR of the tall ``[rows, C]`` matrix, then the SVD of its
    small triangle; the cut-off for small singular values is ``pinv``'s), about 3× faster than
    the SVD of the whole matrix that ``pinv`` takes: a DM fit has 100 samples × every
    position as rows (102 400 of them for an end map of 32×32). CUDA's ``lstsq`` has no
    rank-revealing driver, so a GPU keeps ``pinv``.
    """
    if x.device.type == "cpu":
        return torch.linalg.lstsq(x, y, driver="gelsd").solution
    return torch.linalg.pinv(x) @ y


def reduced_rank_solution(front: torch.Tensor, end: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """The least-squares affine map of rank ``rank`` (reduced-rank regression), in float64.

    The full solution's centred fitted values ``Ŷ`` are projected on their top-``r`` right
    singular vectors ``V_r`` (Eckart–Young on ``Ŷ``; the bias is never rank-constrained).

    Returns:
        ``(down [r, C_in], up [C_out, r], bias [C_out])`` with ``W = up · down``, in ``front``'s dtype.
    """
    x, y = front.double(), end.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    full = min_norm_lstsq(xc, yc)  # [C_in, C_out]
    _, _, vh = torch.linalg.svd(xc @ full, full_matrices=False)
    v = vh[:rank].T  # [C_out, r]
    down = (full @ v).T  # [r, C_in]
    bias = mean_y - v @ (down @ mean_x)
    return down.to(front.dtype), v.to(front.dtype), bias.to(front.dtype)


def batches(inputs, size: int):
    """Split a batch of inputs (a tensor, or a dict of tensors sharing the first dimension)."""
    if isinstance(inputs, dict):
        count = len(next(iter(inputs.values())))
        return [{k: v[s:s + size] for k, v in inputs.items()} for s in range(0, count, size)]
    return list(inputs.split(size))


def to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@torch.no_grad()
def head_activations(head: nn.Module, inputs, device, batch_size: int = 100,
                     transform=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``head``'s activations on ``inputs`` in eval mode (each batch through ``transform`` if
    given) and the real-token mask (``None`` for images); the head's mode is restored."""
    mode = head.training
    head.eval()
    kept, masks = [], []
    for chunk in batches(inputs, batch_size):
        a, context = head(to_device(chunk, device))
        kept.append((transform(a) if transform is not None else a).float())
        masks.append(context.attention_mask)
    head.train(mode)
    return torch.cat(kept), None if masks[0] is None else torch.cat(masks)


@torch.no_grad()
def fit_dm(stitch: Stitch | TokenStitch, front_head: nn.Module, end_head: nn.Module, inputs,
           batch_size: int = 100) -> None:
    """Initialise ``stitch`` with the DM solution on ``inputs`` (both heads in eval mode).

    ``front_head``/``end_head`` return ``(activation, context)``; padded tokens (the end
    context's attention mask) are left out of the least squares.
    """
    device = stitch.weight.device
    fronts, _ = head_activations(front_head, inputs, device, batch_size, transform=stitch.prepare)
    ends, mask = head_activations(end_head, inputs, device, batch_size)
    stitch.fit(fronts, ends, mask)


@torch.no_grad()
def head_projection(head: nn.Module, layout: Layout, inputs, rank: int, device,
                    batch_size: int = 100) -> RankProjection:
    """The top-``rank`` principal projection of ``head``'s activations on ``inputs`` (every
    position or real token a row, channels as features): what ``stitch.front_rank`` applies."""
    a, mask = head_activations(head, inputs, device, batch_size)
    return principal_projection(layouts.as_rows(a, layout, mask), rank, layout).to(device)


def fit_front_projection(stitch: Stitch | TokenStitch, front_head: nn.Module, inputs, rank: int) -> RankProjection:
    """Set ``stitch.projection`` to :func:`head_projection` of the front on ``inputs`` and return it."""
    stitch.projection = head_projection(front_head, stitch.front_layout, inputs, rank, stitch.weight.device)
    return stitch.projection
