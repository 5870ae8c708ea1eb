"""Linear probes on a model's cut points: how much of the task a layer's representation makes
linearly readable (the library behind ``python -m stitching.probe`` and the grounding tests).

A probe is a linear classifier (softmax regression on standardised features, Adam) trained on
the training split of the stitching data — un-augmented — and scored on its test split, on a
cut point's activation, pooled or whole, after the rank truncation a stitch sees with
``stitch.front_rank``. Results are cached per (model, layer, rank, settings, the probe's data
themselves) beside the zoo.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from stitching.errors import StitchingError
from stitching.models import cut, cut_point_names
from stitching.models.layout import channels, per_sample, pooled
from stitching.runtime import Stopwatch, write_json_atomic
from stitching.stitch_layers import RankProjection, head_activations, head_projection


@dataclass(frozen=True)
class ProbeSettings:
    pool: bool = True
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 256
    seed: int = 0  # the probe's initialisation and batch order, and the DM samples of the projection
    dm_samples: int = 100  # inputs the rank projection is fitted on (as the stitch's)


def probe_settings(settings) -> ProbeSettings:
    """The ``probe.*`` settings of a run's :class:`~stitching.build.Settings`."""
    p = settings.config["probe"]
    return ProbeSettings(bool(p["pool"]), int(p["epochs"]), float(p["lr"]), int(p["batch_size"]), settings.seed,
                         settings.stitch.dm_samples)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              classes: int, epochs: int = 30, lr: float = 1e-2, batch_size: int = 256, seed: int = 0) -> dict:
    """Softmax regression on ``[n, d]`` features, standardised with the training mean and std;
    returns ``train_acc`` and ``test_acc``."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], classes)
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        for pick in torch.randperm(len(train_x), generator=generator).split(batch_size):
            optimiser.zero_grad()
            nn.functional.cross_entropy(probe(train_x[pick]), train_y[pick]).backward()
            optimiser.step()
    with torch.no_grad():
        accuracy = lambda x, y: float((probe(x).argmax(1) == y).float().mean())  # noqa: E731
        return {"train_acc": accuracy(train_x, train_y), "test_acc": accuracy(test_x, test_y)}


def cut_features(head: nn.Module, layout, inputs: torch.Tensor, pool: bool, device,
                 projection: RankProjection | None = None, batch_size: int = 250) -> torch.Tensor:
    """``[n, d]`` features of a cut point: the (rank-projected) activation, pooled or whole."""
    def features(a):
        a = projection(a) if projection is not None else a
        return pooled(a, layout) if pool else per_sample(a, layout)

    return head_activations(head, inputs, device, batch_size, transform=features)[0].cpu()


class Prober:
    """Probe accuracies of any model's cut points on one image dataset, cached on disk.

    ``projection_inputs``: the inputs rank projections are fitted on (the stitch's DM samples).
    """

    def __init__(self, datamodule, settings: ProbeSettings, cache_dir: str | Path | None, device="cpu",
                 projection_inputs: torch.Tensor | None = None):
        if getattr(datamodule, "kind", "image") == "text":
            raise StitchingError("linear probes read image classification data; this dataset is text")
        self.settings, self.device = settings, torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        datamodule.setup()
        train = datamodule.train_dataset(augment=False)
        self.train_x = torch.stack([train[i][0] for i in range(len(train))])
        self.train_y = datamodule.arrays.train_y.long()
        self.test_x, self.test_y = datamodule.test_tensors()
        self.classes = int(datamodule.num_classes)
        self.dataset = datamodule.name
        self.projection_inputs = projection_inputs if projection_inputs is not None else \
            datamodule.sample_train_images(settings.dm_samples, seed=settings.seed)
        # the cache is keyed by the data themselves, so a probe fitted on other images (another
        # subset of the same size, a shortcut, another seed) is never read back as this one
        content = hashlib.sha256()
        for tensor in (self.train_x, self.train_y, self.test_x, self.test_y, self.projection_inputs):
            content.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            content.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.data_digest = content.hexdigest()[:16]

    def _path(self, key: str, layer: int, rank: int | None) -> Path | None:
        if self.cache_dir is None:
            return None
        what = {"dataset": self.dataset, "data": self.data_digest, **asdict(self.settings)}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
        return self.cache_dir / key.replace("/", "_") / f"layer{layer}-rank{rank or 'full'}-{digest}.json"

    def projection(self, model: nn.Module, layer: int, rank: int | None) -> RankProjection | None:
        """The top-``rank`` principal projection of ``layer``'s activation on the projection inputs."""
        if rank is None:
            return None
        c = cut(model, layer)
        width = channels(head_activations(c.head, self.projection_inputs[:2], self.device)[0], c.layout)
        if rank > width:
            raise StitchingError(f"rank {rank} exceeds the {width} channels of cut point {layer}")
        return head_projection(c.head, c.layout, self.projection_inputs, rank, self.device)

    def accuracy(self, model: nn.Module, key: str, layer: int, rank: int | None = None) -> dict:
        """``{"train_acc", "test_acc", ...}`` of a probe on ``model``'s cut point ``layer`` (1-based),
        after truncation to ``rank`` principal directions (``None``: the full activation)."""
        path = self._path(key, layer, rank)
        if path is None:
            return self._fit(model, key, layer, rank, None)
        cached = _cached(path)
        if cached is not None:
            return cached
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # jobs asking for one probe at once: the first fits it, the others read it
            return _cached(path) or self._fit(model, key, layer, rank, path)

    def _fit(self, model: nn.Module, key: str, layer: int, rank: int | None, path: Path | None) -> dict:
        watch = Stopwatch()
        model = model.eval().to(self.device)
        c = cut(model, layer)
        with watch.section("features_s"):
            projection = self.projection(model, layer, rank)
            train = cut_features(c.head, c.layout, self.train_x, self.settings.pool, self.device, projection)
            test = cut_features(c.head, c.layout, self.test_x, self.settings.pool, self.device, projection)
        with watch.section("probe_s"):
            s = self.settings
            scores = fit_probe(train, self.train_y, test, self.test_y, self.classes, s.epochs, s.lr, s.batch_size, s.seed)
        record = {"model": key, "layer": layer, "layer_name": cut_point_names(model)[layer - 1], "rank": rank,
                  "features": train.shape[1], **scores, "settings": asdict(self.settings), "dataset": self.dataset,
                  "train_images": len(self.train_x), "test_images": len(self.test_x), "timings": watch.report()}
        if path is not None:
            write_json_atomic(path, record)
        return {**record, "cached": False}


def _cached(path: Path) -> dict | None:
    """A cached probe result (``None``: none, or an unreadable entry, which is fitted again)."""
    if not path.is_file():
        return None
    try:
        return {**json.loads(path.read_text()), "cached": True}
    except (OSError, ValueError):
        return None


def build_prober(settings) -> Prober:
    """The prober of a run's :class:`~stitching.build.Settings`: its data, ``probe.*``, its zoo."""
    from stitching.build import build_datamodule

    return Prober(build_datamodule(settings), probe_settings(settings), Path(settings.zoo.dir) / "probes",
                  settings.device)
