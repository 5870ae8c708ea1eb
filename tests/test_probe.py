"""Linear probes: separable data are read perfectly, shuffled labels at chance; the tool reads a
zoo model's cut points, truncates them as the stitch does and caches what it measured, once for
jobs that ask at the same time."""

import json

import pytest
import torch

from stitching.probes import ProbeSettings, Prober, fit_probe


def _blobs(n=600, d=5, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=generator) * 6
    y = torch.randint(0, classes, (n,), generator=generator)
    return centres[y] + torch.randn(n, d, generator=generator), y


def test_a_probe_reads_separable_classes_and_nothing_from_shuffled_labels():
    x, y = _blobs()
    scores = fit_probe(x[:400], y[:400], x[400:], y[400:], 4, epochs=20)
    assert scores["test_acc"] > 0.98 and scores["train_acc"] > 0.98
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = fit_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 4, epochs=20)
    assert abs(chance["test_acc"] - 0.25) < 0.1


def test_probes_on_a_zoo_model_are_truncated_like_the_stitch_and_cached(tiny_config, tmp_path):
    from stitching.build import build_datamodule, build_zoo, read_settings

    cfg = tiny_config()
    model, record = build_zoo(cfg).get(read_settings(cfg).front.spec)
    prober = Prober(build_datamodule(cfg), ProbeSettings(epochs=5), tmp_path / "probes")
    full = prober.accuracy(model, record["key"], 9)
    assert not full["cached"] and full["test_acc"] > 0.5  # the penultimate layer of a trained classifier
    rank1 = prober.accuracy(model, record["key"], 9, rank=1)
    assert rank1["test_acc"] < full["test_acc"] - 0.1  # one direction cannot carry ten classes
    again = prober.accuracy(model, record["key"], 9, rank=1)
    assert again["cached"] and again["test_acc"] == rank1["test_acc"]
    # a subset, or the same images marked with a shortcut: other data, never this cache
    for other in (["dataset.train_subset=300"], ["shortcut=pixels"]):
        elsewhere = Prober(build_datamodule(tiny_config(*other)), ProbeSettings(epochs=5), tmp_path / "probes")
        assert elsewhere._path(record["key"], 9, 1) != prober._path(record["key"], 9, 1)
    same = Prober(build_datamodule(tiny_config()), ProbeSettings(epochs=5), tmp_path / "probes")
    assert same.accuracy(model, record["key"], 9, rank=1)["cached"]
    files = list((tmp_path / "probes").rglob("*.json"))
    assert len(files) == 2 and {json.loads(f.read_text())["rank"] for f in files} == {None, 1}
    with pytest.raises(Exception, match="exceeds"):
        prober.accuracy(model, record["key"], 1, rank=10_000)


def test_two_jobs_asking_for_one_probe_at_once_fit_it_once(tiny_config, tmp_path, monkeypatch):
    import threading
    import time

    import stitching.probes as probes
    from stitching.build import build_datamodule, build_zoo, read_settings

    cfg = tiny_config()
    model, record = build_zoo(cfg).get(read_settings(cfg).front.spec)
    fits, real = [], probes.fit_probe

    def slow_fit(*args, **kwargs):  # the real fit, slow enough that both jobs find no cached result first
        fits.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(probes, "fit_probe", slow_fit)
    both, results = threading.Barrier(2), []

    def job():
        prober = Prober(build_datamodule(cfg), ProbeSettings(epochs=2), tmp_path / "probes")
        both.wait()
        results.append(prober.accuracy(model, record["key"], 5))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fits) == 1 and sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["test_acc"] == results[1]["test_acc"]
