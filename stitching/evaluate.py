"""What each testbed reports beyond clean test accuracy.

* class subsets: accuracy on the stitching classes and on the rest (``test/acc`` is all);
* shortcuts: accuracy on test images carrying their class's marker;
* attacks: robust accuracy by PGD and/or AutoAttack on the first N test images, for the
  stitched network and for the base models.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from stitching.attacks import autoattack_accuracy, pgd
from stitching.data import ImageDataModule
from stitching.models.cutting import cut_point_activations, pooled
from stitching.similarity import linear_cka
from stitching.runtime import write_json_atomic


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])


def pgd_accuracy(model: nn.Module, images, labels, device, attack: dict, batch_size: int = 256) -> float:
    settings = {k: attack[k] for k in ("eps", "step_size", "steps", "random_start")}
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x_adv = pgd(model, x.to(device), y.to(device), **settings)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1).cpu() == y).sum().item()
    return correct / len(labels)


def robust_metrics(model: nn.Module, datamodule: ImageDataModule, attack: dict, device, seed: int = 0) -> dict:
    """``robust_acc/pgd`` and/or ``robust_acc/autoattack`` as the attack config asks."""
    metrics = {}
    if not (attack.get("eval_pgd") or attack.get("eval_autoattack")):
        return metrics
    images, labels = datamodule.test_tensors(int(attack["eval_images"]))
    model = model.to(device).eval()
    if attack.get("eval_pgd"):
        torch.manual_seed(seed)
        metrics["robust_acc/pgd"] = pgd_accuracy(model, images, labels, device, attack)
    if attack.get("eval_autoattack"):
        metrics["robust_acc/autoattack"] = autoattack_accuracy(
            model, images, labels, eps=attack["eps"], version=attack["autoattack_version"], seed=seed)
    return metrics


def cached_robust_metrics(model: nn.Module, checkpoint: str | Path, datamodule: ImageDataModule, attack: dict,
                          device, seed: int = 0) -> dict:
    """:func:`robust_metrics` of a base model, remembered beside its checkpoint.

    Base models are fixed, so a sweep attacks each of them once per attack setting, not
    once per run. The cache file ``<checkpoint>.robust.json`` maps settings to metrics.
    ``model`` itself is left untouched (a copy is attacked, and only on a cache miss).
    """
    wanted = {k: attack[k] for k in ("eps", "step_size", "steps", "random_start", "eval_pgd", "eval_autoattack",
                                     "autoattack_version", "eval_images")}
    key = json.dumps({**wanted, "dataset": datamodule.name, "seed": seed}, sort_keys=True)
    cache = Path(checkpoint).with_suffix(".robust.json")
    with FileLock(str(cache) + ".lock"):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            known[key] = robust_metrics(copy.deepcopy(model), datamodule, attack, device, seed)
            write_json_atomic(cache, known)
    return known[key]


def penultimate_cka(network: nn.Module, end: nn.Module, datamodule: ImageDataModule, attack: dict, device) -> float:
    """Linear CKA between the stitched network's and the end model's penultimate features.

    Features are the globally pooled activations that enter the classifier; inputs are PGD
    examples crafted against the stitched network (clean test images when ``eps`` is 0).
    FuLA paper, Fig. 6, computes it for the DM-initialised stitch.
    """
    images, labels = datamodule.test_tensors(int(attack["eval_images"]))
    network, end = network.to(device).eval(), end.to(device).eval()
    settings = {k: attack[k] for k in ("eps", "step_size", "steps", "random_start")}
    stitched, native = [], []
    for x, y in zip(images.split(256), labels.split(256)):
        x, y = x.to(device), y.to(device)
        if settings["eps"] > 0:
            x = pgd(network, x, y, **settings)
        with torch.no_grad():
            stitched.append(pooled(network(x, return_features=True)[1][-1]).cpu())
            native.append(pooled(cut_point_activations(end, x)[1][-1]).cpu())
    return linear_cka(torch.cat(stitched), torch.cat(native))


def testbed_metrics(network: nn.Module, datamodule: ImageDataModule, device) -> dict:
    """Class-subset and shortcut accuracies of the stitched network (where configured)."""
    metrics = {}
    k = datamodule.num_classes_train
    if k is not None or datamodule.shortcut is not None:
        images, labels = datamodule.test_tensors()
        predicted = predictions(network, images, device)
        if k is not None:
            seen = labels < k
            metrics["test/acc_seen_classes"] = (predicted[seen] == labels[seen]).float().mean().item()
            if (~seen).any():
                metrics["test/acc_unseen_classes"] = (predicted[~seen] == labels[~seen]).float().mean().item()
        if datamodule.shortcut is not None:
            marked, labels = datamodule.test_tensors(with_shortcut=True)
            metrics["test/acc_shortcut"] = (predictions(network, marked, device) == labels).float().mean().item()
    return metrics


def evaluation_settings(attack: dict, shortcut: dict | None, datamodule: ImageDataModule) -> dict:
    """What was evaluated, for ``results.json``: attacks with their image counts, testbeds."""
    settings: dict = {"test_images": len(datamodule.arrays.test_y)}
    attacks = {}
    n = min(int(attack["eval_images"]), len(datamodule.arrays.test_y))
    if attack.get("eval_pgd"):
        attacks["pgd"] = {"images": n, **{k: attack[k] for k in ("eps", "step_size", "steps", "random_start")}}
    if attack.get("eval_autoattack"):
        attacks["autoattack"] = {"images": n, "eps": attack["eps"], "version": attack["autoattack_version"],
                                 "norm": "Linf"}
    if attacks:
        settings["attacks"] = attacks
    if float(attack.get("alpha", 0)) > 0:
        settings["adversarial_stitching"] = {"alpha": attack["alpha"], "eps": attack["eps"],
                                             "step_size": attack["step_size"], "steps": attack["steps"]}
    if datamodule.shortcut is not None:
        settings["shortcut"] = dict(shortcut)
    if datamodule.num_classes_train is not None:
        settings["num_classes_train"] = datamodule.num_classes_train
    return settings
