"""``python -m stitching.probe`` — linear probes on a model's cut points: how much of the task a
layer's representation makes linearly readable.

A probe is a linear classifier (softmax regression on standardised features, Adam) trained on
the training split of the stitching data — un-augmented — and scored on its test split. The
features are a cut point's activation, pooled (a map's spatial mean, the layout's pooled token)
or whole (``probe.pool=false``), after the same rank truncation a stitch sees with
``stitch.front_rank``: the top principal directions over channels, fitted on the DM samples.
Results are cached per (model, layer, rank, settings) beside the zoo, so a grounding test that
asks again reads them back.

Writes ``probes.json``, ``probes.csv`` and ``probes.png`` (accuracy per layer) to ``--out``.

Example: ``python -m stitching.probe experiment=small probe.layers=[1,5,9] probe.rank=4``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from stitching.errors import StitchingError, exit_on_user_error
from stitching.models import cut, cut_point_names
from stitching.models.layout import channels, per_sample, pooled
from stitching.runtime import Stopwatch, versions, write_json_atomic
from stitching.stitch_layers import RankProjection, head_activations, head_projection


@dataclass(frozen=True)
class ProbeSettings:
    pool: bool = True
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 256
    seed: int = 0  # the probe's initialisation and batch order, and the DM samples of the projection
    dm_samples: int = 100  # inputs the rank projection is fitted on (as the stitch's)


def probe_settings(cfg: DictConfig) -> ProbeSettings:
    p = cfg.probe
    return ProbeSettings(bool(p.pool), int(p.epochs), float(p.lr), int(p.batch_size), int(cfg.seed),
                         int(cfg.stitch.dm_samples))


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

    def _path(self, key: str, layer: int, rank: int | None) -> Path | None:
        if self.cache_dir is None:
            return None
        what = {"dataset": self.dataset, "train": len(self.train_x), "test": len(self.test_x), **asdict(self.settings)}
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
        if path is not None and path.is_file():
            try:
                return {**json.loads(path.read_text()), "cached": True}
            except (OSError, ValueError):
                pass  # an unreadable cache entry is recomputed
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
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record)
        return {**record, "cached": False}


def build_prober(cfg: DictConfig, device) -> Prober:
    from stitching.build import build_datamodule

    return Prober(build_datamodule(cfg), probe_settings(cfg), Path(cfg.zoo.dir) / "probes", device)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from stitching.build import compose_config, load_models, read_settings
    from stitching.models import resolve_layer

    parser = argparse.ArgumentParser(prog="python -m stitching.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: outputs/probes/<time>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train (probe.side, probe.layers, "
                        "probe.rank, probe.pool, probe.epochs…; default: experiment=demo)")
    args = parser.parse_args(argv)
    watch = Stopwatch()
    cfg = compose_config(args.overrides or ["experiment=demo"])
    settings = read_settings(cfg)
    side = str(cfg.probe.side)
    if side not in ("front", "end"):
        raise StitchingError(f"probe.side={side}: choose front or end")
    front, front_record, end, end_record = load_models(cfg, settings, stitched=False)
    model, record = (front, front_record) if side == "front" else (end, end_record)
    layers = cfg.probe.layers
    layers = [resolve_layer(model, v) for v in layers] if layers is not None else \
        list(range(1, len(cut_point_names(model)) + 1))
    prober = build_prober(cfg, settings.device)
    rank = cfg.probe.rank
    rows = [prober.accuracy(model, record["key"], layer, rank)
            for layer in tqdm(layers, desc="probes", disable=args.no_progress, leave=False)]
    out = Path(args.out) if args.out else Path("outputs/probes") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{k: r[k] for k in ("layer", "layer_name", "rank", "features", "train_acc", "test_acc", "cached")}
                          for r in rows]).fillna({"rank": "full"})
    frame.to_csv(out / "probes.csv", index=False)
    write_json_atomic(out / "probes.json", {"model": record["key"], "side": side, "probes": rows,
                                            "timings": watch.report(), "versions": versions()})
    _plot(frame, record["key"], out / "probes.png")
    print(f"linear probes on {record['key']} ({prober.dataset}: {len(prober.train_x)} train / "
          f"{len(prober.test_x)} test images, {'pooled' if prober.settings.pool else 'whole'} activations"
          f"{'' if rank is None else f', rank {rank}'})")
    print(frame.round(4).to_string(index=False))
    print(f"results in {out.resolve()}")


def _plot(frame: pd.DataFrame, title: str, path: Path) -> None:
    from stitching.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(frame["layer"], frame["test_acc"], marker="o", label="test")
    ax.plot(frame["layer"], frame["train_acc"], marker=".", ls="--", label="train")
    ax.set(xlabel="cut point", ylabel="probe accuracy", title=title, ylim=(0, 1.02))
    ax.legend()
    _save(plt, fig, path)


if __name__ == "__main__":
    main(sys.argv[1:])
