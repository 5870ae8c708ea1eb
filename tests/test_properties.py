"""The input contract, tested by generation: Hypothesis draws out-of-range and wrong-type
values for every setting in the contract (``validation.RULES``; the inapplicable ones of
``validation.APPLIES`` are generated in ``test_bad_input.py``), for every ``stitching.stitch()``
argument, and breaks the data in random places; each must end in one ``error:`` line / one :class:`StitchingError`, never a
traceback, a silent run or an ``ok`` record.

The value strategies are written from each rule's *description* (its type and bounds), not
by calling the rule, so a rule that lets a bad value through fails here. ``make test`` runs
few examples per property (profile ``ci``); ``make test-full`` runs many (``HYPOTHESIS_PROFILE=full``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from stitching.errors import StitchingError
from stitching.validation import API_SETTINGS, RULES, Rule, check_config
from tests.conftest import TINY, compose_config, train_cli

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("full", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_values(rule: Rule) -> st.SearchStrategy:
    """Values outside ``rule``: the wrong type, non-finite, beyond a bound, null where not allowed."""
    options = [WORDS, NON_FINITE]
    if rule.kind == "bool":
        options += [st.integers(-5, 5), st.floats(allow_nan=False)]
    else:
        options.append(st.booleans())
    if rule.kind == "int":
        options.append(st.floats(-1e6, 1e6).filter(lambda v: not float(v).is_integer()))
    if rule.kind == "fraction":
        options += [st.integers(max_value=0), st.floats(1.0, 1e6, exclude_min=True),
                    st.floats(-1e6, 0.0)]
    elif rule.kind in ("int", "float"):
        whole = rule.kind == "int"
        if rule.low is not None:  # at the bound when it is open, else strictly below it (never -0.0)
            if whole:
                options.append(st.integers(-2 ** 62, int(rule.low) - (0 if rule.low_open else 1)))
            else:
                options.append(st.floats(-1e12, rule.low if rule.low_open else rule.low - 1e-9))
        if rule.high is not None:
            options.append(st.integers(int(rule.high) + 1, 2 ** 62) if whole else
                           st.floats(rule.high, 1e12, exclude_min=True))
    if not rule.nullable:
        options.append(st.none())
    return st.one_of(*options)


def good_values(rule: Rule) -> st.SearchStrategy:
    """Values inside ``rule``, from its bounds."""
    if rule.kind == "bool":
        return st.booleans()
    if rule.kind == "fraction":
        return st.one_of(st.integers(1, 10_000), st.floats(0.0, 1.0, exclude_min=True))
    low = rule.low if rule.low is not None else -1e6
    high = rule.high if rule.high is not None else low + 1e6
    if rule.kind == "int":
        return st.integers(int(low) + (1 if rule.low_open else 0), int(high))
    return st.floats(low, high, exclude_min=rule.low_open)


def override(key: str, value) -> str:
    """``value`` as a Hydra command-line override that forces ``key``."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, str):
        text = f"'{value}'"
    else:
        text = repr(value)
    return f"++{key}={text}"


@pytest.fixture(scope="module")
def base_config():
    return compose_config(*TINY)


KEYS = sorted(RULES)


@given(data=st.data())
def test_every_setting_refuses_what_its_rule_forbids_and_keeps_what_it_allows(data, base_config):
    key = data.draw(st.sampled_from(KEYS), label="key")
    rule = RULES[key]
    bad = data.draw(bad_values(rule), label="bad")
    cfg = base_config.copy()
    OmegaConf.update(cfg, key, bad, force_add=True)
    with pytest.raises(StitchingError, match=rf"^{re.escape(key)}=.* is out of range: it must be"):
        check_config(cfg)
    good = data.draw(good_values(rule), label="good")
    cfg = base_config.copy()
    OmegaConf.update(cfg, key, good, force_add=True)
    try:
        check_config(cfg)
    except StitchingError as err:  # a value in range may still not apply here (stitch.rank off low_rank)
        assert "out of range" not in str(err) or not str(err).startswith(f"{key}="), str(err)


_runs = itertools.count()


@settings(max_examples=int(os.environ.get("STITCHING_CLI_EXAMPLES", "25")))
@given(data=st.data())
def test_the_command_line_refuses_any_bad_setting_in_one_line(data, tmp_path, zoo_dir, monkeypatch, capsys):
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(bad_values(RULES[key]), label="value")
    run_dir = tmp_path / f"run{next(_runs)}"
    code, output = train_cli([*TINY, f"paths.zoo_dir={zoo_dir}", f"hydra.run.dir={run_dir}", override(key, value)],
                             monkeypatch, capsys)
    assert code == 2 and "Traceback" not in output, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], output[-2000:]
    for path in run_dir.rglob("results.json"):
        assert json.loads(path.read_text())["status"] != "ok"


@given(data=st.data())
def test_the_api_refuses_any_bad_argument(data, pair):
    import stitching

    front, end, x, y = pair
    name = data.draw(st.sampled_from(sorted(API_SETTINGS)), label="argument")
    value = data.draw(bad_values(RULES[API_SETTINGS[name]]), label="value")
    with pytest.raises(StitchingError, match=rf"^{name}=.* is out of range: it must be .* \(the command line's "):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), progress=False, **{name: value})


CORRUPTIONS = ("non-finite", "above-one", "below-zero", "label-high", "label-negative", "label-float", "empty")


@given(data=st.data())
def test_the_api_refuses_data_broken_anywhere(data, pair):
    """One value broken at a random place, in the training or the test data: one line, before training."""
    import stitching

    front, end, x, y = pair
    kind = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    where = data.draw(st.sampled_from(["train", "test"]), label="where")
    n, c, h, w = x.shape
    i, k, r, s = (data.draw(st.integers(0, size - 1)) for size in (n, c, h, w))
    images, labels = x.clone(), y.clone()
    if kind == "non-finite":
        images[i, k, r, s] = data.draw(NON_FINITE)
    elif kind == "above-one":
        images[i, k, r, s] = data.draw(st.floats(1.01, 1e6))
    elif kind == "below-zero":
        images[i, k, r, s] = data.draw(st.floats(-1e6, -0.01))
    elif kind == "label-high":
        labels[i] = data.draw(st.integers(10, 10_000))
    elif kind == "label-negative":
        labels[i] = data.draw(st.integers(-10_000, -1))
    elif kind == "label-float":
        labels = labels.float()
    else:
        images, labels = images[:0], labels[:0]
    broken = (images, labels)
    train, test = (broken, (x, y)) if where == "train" else ((x, y), broken)
    with pytest.raises(StitchingError) as caught:
        stitching.stitch(front, end, 2, 2, objective="hint", train=train, test=test, epochs=1, progress=False)
    assert "\n" not in str(caught.value)
