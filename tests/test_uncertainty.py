"""Bootstrap intervals and permutation nulls of similarity scores: coverage, calibration, the grid tool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stitching.similarity import linear_cka
from stitching.similarity.uncertainty import bootstrap_interval, permutation_null


def _correlated(n, rho, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y[:, 0] = rho * x[:, 0] + (1 - rho**2) ** 0.5 * y[:, 0]
    return x, y


def _first_correlation(x, y):  # an index whose population value is known: ρ of the first columns
    return float(np.corrcoef(x[:, 0].numpy(), y[:, 0].numpy())[0, 1])


def test_bootstrap_intervals_cover_the_true_value_at_about_their_level():
    rho, hits = 0.6, 0
    for repeat in range(60):
        x, y = _correlated(120, rho, repeat)
        low, high = bootstrap_interval(_first_correlation, x, y, draws=150, seed=repeat)
        hits += low <= rho <= high
    assert 0.85 <= hits / 60 <= 1.0  # nominal 95 %; resampling x and y rows apart would cover ~never
    x, y = _correlated(120, rho, 99)
    assert bootstrap_interval(_first_correlation, x, y, seed=1) == bootstrap_interval(_first_correlation, x, y, seed=1)


def test_the_permutation_null_is_chance_for_unrelated_and_rejects_related_representations():
    p_values, observed, null_means = [], [], []
    for repeat in range(40):
        x, y = _correlated(40, 0.0, repeat)
        null = permutation_null(linear_cka, x, y, permutations=100, seed=repeat)
        p_values.append(null.p_value)
        observed.append(linear_cka(x, y))
        null_means.append(null.mean)
    assert np.mean(np.array(p_values) < 0.05) <= 0.15  # calibrated: about 5 % false alarms
    assert np.mean(null_means) == pytest.approx(np.mean(observed), rel=0.15)  # the chance level CKA really has here
    assert np.mean(observed) > 0.02  # biased CKA of unrelated data is not 0 at this n: why the null matters
    x, y = _correlated(40, 0.95, 0)
    related = permutation_null(linear_cka, x, y, permutations=100, seed=0)
    assert related.p_value == pytest.approx(1 / 101) and linear_cka(x, y) > related.q95


def test_the_grid_tool_writes_intervals_and_chance_levels(tmp_path, zoo_dir, capsys):
    from tests.conftest import TINY

    from stitching.similarity.__main__ import main

    main(["--index", "cka,rsa", "--images", "32", "--layers", "3,9", "--bootstrap", "20", "--permutations", "20",
          "--no-progress", "--out", str(tmp_path / "sim"), *TINY, f"paths.zoo_dir={zoo_dir}",
          f"paths.output_dir={tmp_path}"])
    record = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    for index in ("cka", "rsa"):
        parts = record["intervals"][index]
        for i in range(2):
            for j in range(2):
                assert parts["low"][i][j] <= parts["high"][i][j]
                assert 1 / 21 <= parts["p_value"][i][j] <= 1
    import pandas as pd

    frame = pd.read_csv(tmp_path / "sim" / "similarity.csv")
    assert {"low", "high", "null_mean", "null_q95", "p_value"} <= set(frame.columns)
    assert "cells above chance" in capsys.readouterr().out
