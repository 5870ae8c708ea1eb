"""Base models: trained once with the paper's recipe, cached atomically, reused.

A base model is identified by (architecture, width, dataset, seed, robust) and the
number of training epochs, so a 2-epoch CPU model is never mistaken for a full one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from filelock import FileLock, Timeout
from torch import nn
from torch.nn import functional as F

from stitching.attacks import pgd
from stitching.data import ImageDataModule
from stitching.errors import StitchingError
from stitching.models import build_model, is_transformer
from stitching.runtime import build_trainer, versions, write_json_atomic


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    width: int
    dataset: str
    seed: int
    robust: bool = False
    depth: int | None = None  # transformers only

    def key(self, epochs: int) -> str:
        robust = "-robust" if self.robust else ""
        depth = f"-d{self.depth}" if self.depth is not None else ""
        return f"{self.arch}-w{self.width}{depth}-{self.dataset}-s{self.seed}{robust}-e{epochs}"


class ClassifierModule(L.LightningModule):
    """Supervised training of a base model: SGD with momentum, lr ×0.1 at each third (the
    papers' ResNet recipe), or AdamW with a cosine schedule (``optimizer="adamw"``, ViTs).

    With ``adversarial`` (``alpha``, ``eps``, ``step_size``, ``steps``) the loss is the
    FuLA paper's Eq. (4): ``(1 − α)·CE(x) + α·CE(PGD(x))``.
    """

    def __init__(self, model: nn.Module, num_classes: int, epochs: int, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, adversarial: dict | None = None,
                 optimizer: str = "sgd"):
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise StitchingError(f"unknown base-model optimizer '{optimizer}'; choose sgd or adamw")
        self.optimizer = optimizer
        self.model = model
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.adversarial = dict(adversarial) if adversarial else None
        metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        self.train_acc, self.test_acc = metric(), metric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if self.adversarial:
            attack = {k: v for k, v in self.adversarial.items() if k != "alpha"}
            alpha = float(self.adversarial["alpha"])
            x_adv = pgd(self.model, x, y, **attack)
            loss = (1 - alpha) * loss + alpha * F.cross_entropy(self.model(x_adv), y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.model(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        thirds = sorted({max(1, self.epochs // 3), max(1, 2 * self.epochs // 3)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=thirds, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ModelZoo:
    """A folder of base-model checkpoints, filled on demand.

    Args:
        root: the cache folder.
        recipe: ``epochs, lr, momentum, weight_decay, batch_size``.
        datamodule_for: dataset name → :class:`ImageDataModule` (full training split).
        trainer_options: the ``trainer`` config group (device, precision…).
        train_missing: train a missing model (``True``) or fail with a clear error.
    """

    def __init__(self, root: str | Path, recipe: dict, datamodule_for: Callable[[str], ImageDataModule],
                 trainer_options: dict | None = None, train_missing: bool = True):
        self.root = Path(root)
        self.recipe = dict(recipe)
        self.datamodule_for = datamodule_for
        self.trainer_options = dict(trainer_options or {})
        self.train_missing = train_missing

    def path(self, spec: ModelSpec) -> Path:
        return self.root / f"{spec.key(int(self.recipe['epochs']))}.pt"

    def get(self, spec: ModelSpec, checkpoint: str | None = None) -> tuple[nn.Module, dict]:
        """Load the model for ``spec`` (or an explicit checkpoint), training it if needed."""
        if checkpoint:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise StitchingError(f"checkpoint {path} does not exist; fix the path or drop it to use the zoo")
            return load_checkpoint(path)
        path = self.path(spec)
        if path.is_file():
            return load_checkpoint(path)
        if not self.train_missing:
            raise StitchingError(
                f"no base model {path.name} in {self.root}; train it with "
                f"`python -m stitching.pretrain` or set zoo.train_missing=true"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"[zoo] waiting for another run to finish training {path.name}", flush=True)
            lock.acquire()
        try:
            if not path.is_file():  # someone else may have finished while we waited
                self._train(spec, path)
        finally:
            lock.release()
        return load_checkpoint(path)

    def _train(self, spec: ModelSpec, path: Path) -> None:
        adversarial = None
        if spec.robust:
            if "robust" not in self.recipe:
                raise StitchingError("robust=true needs zoo.recipe.robust (alpha, eps, step_size, steps)")
            adversarial = self.recipe["robust"]
        recipe = dict(self.recipe)
        if is_transformer(spec.arch):  # ViTs do not train with the ResNet recipe's SGD
            recipe.update(recipe.get("transformer") or {})
        epochs = int(recipe["epochs"])
        datamodule = self.datamodule_for(spec.dataset)
        datamodule.batch_size = int(self.recipe.get("batch_size", datamodule.batch_size))
        mean, std = datamodule.normalization()
        model_kwargs = dict(arch=spec.arch, num_classes=datamodule.num_classes, width=spec.width,
                            in_channels=datamodule.in_channels, mean=mean, std=std)
        if spec.depth is not None:
            model_kwargs["depth"] = spec.depth
        if is_transformer(spec.arch):
            model_kwargs["image_size"] = datamodule.image_size
        L.seed_everything(spec.seed, workers=True, verbose=False)
        model = build_model(**model_kwargs)
        module = ClassifierModule(model, datamodule.num_classes, epochs, lr=recipe["lr"],
                                  momentum=recipe.get("momentum", 0.9), weight_decay=recipe["weight_decay"],
                                  adversarial=adversarial, optimizer=recipe.get("optimizer", "sgd"))
        print(f"[zoo] training base model {path.stem} ({epochs} epochs)", flush=True)
        started = time.perf_counter()
        trainer = build_trainer(self.trainer_options, self.root, max_epochs=epochs)
        trainer.fit(module, datamodule=datamodule)
        train_time = time.perf_counter() - started
        test = build_trainer(self.trainer_options, self.root, enable_progress_bar=False)
        test_acc = test.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
        record = {
            "key": path.stem, "spec": asdict(spec), "recipe": recipe, "model_kwargs": model_kwargs,
            "test_acc": float(test_acc), "train_time_s": round(train_time, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
        }
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"record": record, "state_dict": state}, tmp)
        os.replace(tmp, path)
        write_json_atomic(path.with_suffix(".json"), record)
        print(f"[zoo] saved {path} (test acc {test_acc:.4f}, {train_time:.0f}s)", flush=True)

    def list(self) -> list[dict]:
        records = []
        for path in sorted(self.root.glob("*.pt")):
            try:
                records.append({**load_checkpoint(path)[1], "path": str(path)})
            except StitchingError as err:
                records.append({"key": path.stem, "path": str(path), "error": str(err)})
        return records


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a base model and its record from a zoo checkpoint."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        record = payload["record"]
        model = build_model(**record["model_kwargs"])
        model.load_state_dict(payload["state_dict"])
    except StitchingError:
        raise
    except Exception as err:  # truncated, foreign or incompatible file
        raise StitchingError(
            f"checkpoint {path} cannot be loaded ({type(err).__name__}); delete it to retrain"
        ) from None
    return model.eval(), {**record, "path": str(path)}
