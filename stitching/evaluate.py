"""What each testbed reports beyond clean test accuracy.

* class subsets: accuracy on the stitching classes and on the rest (``test/acc`` is all);
* shortcuts: accuracy on test images carrying their class's marker;
* attacks: robust accuracy by PGD and/or AutoAttack on the first N test images, for the
  stitched network and for the base models;
* OOD: how well an energy detector at the end layer tells stitched activations from native ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from stitching.attacks import autoattack_accuracy, pgd, pgd_settings
from stitching.data import ImageDataModule
from stitching.errors import StitchingError
from stitching.models.cutting import cut_point_activations, split
from stitching.models.layout import pooled
from stitching.runtime import cache_lock, tensors_digest, write_cache
from stitching.similarity import linear_cka


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])


def base_accuracy(model: nn.Module, datamodule: ImageDataModule, device) -> float:
    """Clean test accuracy of a base model on the stitching data (given models have no record of it)."""
    images, labels = datamodule.test_tensors()
    return (predictions(copy.deepcopy(model).to(device), images, device) == labels).float().mean().item()


@torch.no_grad()
def pair_accuracy(model: nn.Module, datamodule, data, device, classes: dict | None = None) -> float:
    """Accuracy of a sentence-pair classifier on a :class:`~stitching.data.text.PairDataset`;
    ``classes`` maps the model's classes to the data's (MNLI's three onto HANS' two)."""
    from stitching.stitch_layers import to_device

    model.eval()
    correct = 0
    for batch in datamodule.loader(data):
        labels = batch.pop("labels")
        predicted = model(to_device(batch, device)).argmax(-1).cpu()
        if classes:
            predicted = torch.tensor([int(classes.get(int(c), c)) for c in predicted])
        correct += int((predicted == labels).sum())
    return correct / max(len(data), 1)


def pair_metrics(network: nn.Module, models: dict, datamodule, device) -> tuple[dict, dict]:
    """The stitched network's accuracy on the challenge set, and each base classifier's on the
    test split and the challenge set: ``({metric: value}, {side: {metric: value}})``."""
    challenge = datamodule.challenge_set()
    spec = datamodule.challenge or {}
    classes = {int(k): int(v) for k, v in (spec.get("classes") or {}).items()}
    name = spec.get("name", "challenge")
    stitched = {f"test/{name}_acc": pair_accuracy(network, datamodule, challenge, device, classes)} if challenge else {}
    base = {}
    for side, model in models.items():
        if getattr(model, "num_classes", None) != datamodule.num_classes:
            continue  # not a classifier of these labels
        model = copy.deepcopy(model).to(device)
        base[side] = {"test_acc": pair_accuracy(model, datamodule, datamodule.test_set, device)}
        if challenge:
            base[side][f"{name}_acc"] = pair_accuracy(model, datamodule, challenge, device, classes)
    return stitched, base


def pgd_accuracy(model: nn.Module, images, labels, device, attack: dict, batch_size: int = 256) -> float:
    settings = pgd_settings(attack)
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


def cached_robust_metrics(model: nn.Module, checkpoint: str | Path | None, datamodule: ImageDataModule, attack: dict,
                          device, seed: int = 0) -> dict:
    """:func:`robust_metrics` of a base model, remembered beside its checkpoint.

    Base models are fixed, so a sweep attacks each of them once per attack setting, not
    once per run. The cache file ``<checkpoint>.robust.json`` maps settings to metrics.
    ``model`` itself is left untouched (a copy is attacked, and only on a cache miss).
    """
    wanted = {**pgd_settings(attack),
              **{k: attack[k] for k in ("eval_pgd", "eval_autoattack", "autoattack_version", "eval_images")}}
    return _beside(checkpoint, ".robust.json", {**wanted, "seed": seed}, datamodule,
                   lambda: robust_metrics(copy.deepcopy(model), datamodule, attack, device, seed))


def cached_base_accuracy(model: nn.Module, checkpoint: str | Path | None, datamodule: ImageDataModule,
                         device) -> float:
    """:func:`base_accuracy` of a base model on the run's test images (``dataset.test_subset``),
    remembered beside its checkpoint: the stitch and its two models scored on the same images."""
    return _beside(checkpoint, ".accuracy.json", {}, datamodule, lambda: base_accuracy(model, datamodule, device))


def subset_accuracy(model: nn.Module, record: dict, datamodule, device, own_dataset: bool) -> dict | None:
    """A base model's clean accuracy on the run's test images, where a stitch beside it is scored on
    fewer than the whole split (``dataset.test_subset``) and the model is of the run's task
    (``own_dataset`` and its classes): ``{"test_acc", "test_images"}``, measured once and cached
    beside its file. ``None`` where the zoo's whole-split accuracy already describes those images."""
    subset = (getattr(datamodule, "subsets", None) or {}).get("test_subset")
    if not (subset and subset["how"] != "all" and own_dataset
            and getattr(model, "num_classes", None) == datamodule.num_classes):
        return None
    return {"test_acc": cached_base_accuracy(model, record.get("path"), datamodule, device),
            "test_images": subset["kept"]}


def _beside(checkpoint: str | Path | None, suffix: str, settings: dict, datamodule: ImageDataModule,
            compute: Callable[[], object]):
    """``compute()``, remembered in ``<checkpoint><suffix>`` under ``settings`` and the test images
    it reads (the dataset, and how its test subset was drawn when there is one)."""
    subset = (getattr(datamodule, "subsets", None) or {}).get("test_subset")
    key = json.dumps({**settings, "dataset": datamodule.name, **({"test_subset": subset} if subset else {})},
                     sort_keys=True)
    if checkpoint is None:  # a hub model with no local file: nowhere to cache
        return compute()
    cache = Path(checkpoint).with_suffix(suffix)
    with cache_lock(cache):
        try:
            known = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, ValueError):
            known = {}  # an unreadable cache is recomputed
        if key not in known:
            known[key] = compute()
            write_cache(cache, lambda tmp: tmp.write_text(json.dumps(known, indent=2)))
    return known[key]


def penultimate_cka(network: nn.Module, end: nn.Module, datamodule: ImageDataModule, attack: dict, device,
                    seed: int = 0) -> float:
    """Linear CKA between the stitched network's and the end model's penultimate features.

    Features are the globally pooled activations that enter the classifier; inputs are PGD
    examples crafted against the stitched network (clean test images when ``eps`` is 0).
    FuLA paper, Fig. 6, computes it for the DM-initialised stitch. The attack's random starts
    come from ``seed`` alone, so a grid's cell measures what its own run measures.
    """
    images, labels = datamodule.test_tensors(int(attack["eval_images"]))
    network, end = network.to(device).eval(), end.to(device).eval()
    settings = pgd_settings(attack)
    layout = end.cut_points[-1].layout
    stitched, native = [], []
    generator = torch.Generator().manual_seed(seed)
    for x, y in zip(images.split(256), labels.split(256)):
        x, y = x.to(device), y.to(device)
        if settings["eps"] > 0:
            x = pgd(network, x, y, generator=generator, **settings)
        with torch.no_grad():
            stitched.append(pooled(network(x, return_features=True)[1][-1], layout).cpu())
            native.append(pooled(cut_point_activations(end, x)[1][-1], layout).cpu())
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
        attacks["pgd"] = {"images": n, **pgd_settings(attack)}
    if attack.get("eval_autoattack"):
        attacks["autoattack"] = {"images": n, "eps": attack["eps"], "version": attack["autoattack_version"],
                                 "norm": "Linf"}
    if attacks:
        settings["attacks"] = attacks
    if float(attack.get("alpha", 0)) > 0:
        settings["adversarial_stitching"] = {"alpha": attack["alpha"], **pgd_settings(attack)}
    if datamodule.shortcut is not None:
        settings["shortcut"] = dict(shortcut)
    if datamodule.num_classes_train is not None:
        settings["num_classes_train"] = datamodule.num_classes_train
    return settings


def ood_metrics(network: nn.Module, end: nn.Module, end_layer: int, checkpoint: str | Path | None,
                datamodule: ImageDataModule, options: dict, device, seed: int = 0,
                outlier_dataset: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """How far the stitched activations T(f_{≤i}(x)) stand out from the native g_{≤j}(x).

    An energy detector for cut point j of the end model (fitted once per setting and cached
    beside its checkpoint) scores ``options["eval_images"]`` test images both ways:

    * ``ood/auroc`` — stitched vs native (0.5: indistinguishable; towards 1: stitched looks OOD);
    * ``ood/auroc_outliers`` — outlier vs native test images, on the outlier family it was
      fitted against;
    * ``ood/auroc_heldout`` — with ``options["heldout"]`` (another outlier family, never seen in
      fitting): the detector's quality on OOD data it was not trained to reject;
    * ``ood/energy_native``, ``ood/energy_stitched`` — mean energies;
    * ``ood/detector_acc`` — the detector's own test accuracy as a classifier of native
      activations (how well it learned the in-distribution activations it guards).

    ``outlier_dataset(name) -> (train images, test images)`` loads a named outlier dataset.
    """
    from stitching.similarity.ood import auroc, energy

    detector = cached_energy_detector(end, end_layer, checkpoint, datamodule, options, device, seed, outlier_dataset)
    images, labels = datamodule.test_tensors(int(options["eval_images"]))
    outliers = _outliers_like(images, options["outliers"], seed + 1, outlier_dataset, test=True)
    head, _ = split(copy.deepcopy(end), end_layer)
    head, network = head.to(device).eval(), network.to(device).eval()
    with torch.no_grad():
        native = torch.cat([head(x.to(device))[0].cpu() for x in images.split(256)])
        stitched = torch.cat([network.stitched_activation(x.to(device)).cpu() for x in images.split(256)])
        foreign = torch.cat([head(x.to(device))[0].cpu() for x in outliers.split(256)])
    logits_native = detector.logits(native)
    e_native = energy(logits_native, detector.temperature)
    e_stitched, e_out = (detector.score(a) for a in (stitched, foreign))
    metrics = {"ood/auroc": auroc(e_stitched, e_native), "ood/auroc_outliers": auroc(e_out, e_native),
               "ood/energy_native": float(e_native.mean()), "ood/energy_stitched": float(e_stitched.mean()),
               "ood/detector_acc": float((logits_native.argmax(1) == labels.cpu()).float().mean())}
    if options.get("heldout"):
        held = _outliers_like(images, options["heldout"], seed + 2, outlier_dataset, test=True)
        with torch.no_grad():
            e_held = detector.score(torch.cat([head(x.to(device))[0].cpu() for x in held.split(256)]))
        metrics["ood/auroc_heldout"] = auroc(e_held, e_native)
    return metrics


def cached_energy_detector(end: nn.Module, end_layer: int, checkpoint: str | Path | None,
                           datamodule: ImageDataModule, options: dict, device, seed: int, outlier_dataset=None):
    """The energy detector for ``end`` at ``end_layer``, fitted on a cache miss and stored as
    ``<checkpoint>.ood-l<j>-<settings hash>.pt`` (a sweep fits each one once; a hub model with
    no local file gets a fresh detector per run)."""
    import tempfile

    from stitching.similarity.ood import EnergyDetector, RepresentationClassifier, fit_energy_detector, \
        fit_separate_detector

    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp(prefix="stitching-ood-")) / "end.pt"
    settings = {k: options[k] for k in ("outliers", "epochs", "lr", "batch_size", "m_in", "m_out", "weight",
                                        "train_images")}
    separate = options["detector"] == "separate"
    if separate:  # a tail detector's key (and so its cached file) stays what it was before the kinds
        settings.update({k: options[k] for k in ("detector", "pretrain_epochs", "width")})
    datamodule.setup()
    images = datamodule.arrays.train_x.float().div(255)
    labels = datamodule.arrays.train_y
    if settings["train_images"]:
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: settings["train_images"]]
        images, labels = images[pick], labels[pick]
    outliers = _outliers_like(images, settings["outliers"], seed, outlier_dataset, test=False)
    # the key is what the detector is fitted from, not how it was asked for: the settings, the end
    # model's weights and the very images, labels and outliers (another subset, class split or
    # outlier set is another detector)
    data = tensors_digest([("images", images), ("labels", labels), ("outliers", outliers)])
    key = {**settings, "seed": seed, "end": tensors_digest(sorted(end.state_dict().items())), "data": data}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(checkpoint).with_name(f"{Path(checkpoint).stem}.ood-l{end_layer}-{digest}.pt")
    common = dict(epochs=int(settings["epochs"]), lr=float(settings["lr"]), batch_size=int(settings["batch_size"]),
                  m_in=float(settings["m_in"]), m_out=float(settings["m_out"]), weight=float(settings["weight"]),
                  seed=seed, device=device)
    with cache_lock(path):
        if path.is_file():
            if separate:
                head, _ = split(copy.deepcopy(end), end_layer)
                with torch.no_grad():
                    channels = head.eval()(images[:2])[0].shape[1]
                net = RepresentationClassifier(channels, tuple(images.shape[-2:]), int(datamodule.num_classes),
                                               int(settings["width"]))
            else:
                _, net = split(copy.deepcopy(end), end_layer)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return EnergyDetector(net.eval())
        if separate:
            detector = fit_separate_detector(end, end_layer, images, labels, outliers, int(datamodule.num_classes),
                                             int(settings["width"]), int(settings["pretrain_epochs"]), **common)
        else:
            detector = fit_energy_detector(end, end_layer, images, labels, outliers, **common)
        write_cache(path, lambda tmp: torch.save(detector.net.state_dict(), tmp))
        return detector


def _outliers_like(images: torch.Tensor, kind: str, seed: int, outlier_dataset, test: bool) -> torch.Tensor:
    """Outlier images for ``images``: made from them (``patch_shuffle``, ``noise``) or taken
    from the dataset ``kind`` (its test split, as many as ``images``, when ``test``)."""
    from stitching.similarity.ood import OUTLIER_KINDS, match_images, outlier_images

    if kind in OUTLIER_KINDS:
        return outlier_images(images, kind, seed=seed)
    if outlier_dataset is None:
        raise StitchingError(f"outliers='{kind}' names a dataset, but no dataset loader was given")
    train, held_out = outlier_dataset(kind)
    return match_images(held_out[: len(images)] if test else train, images)
