"""docs/protocols.md states the presets' values beside the papers'; the values it states are the
presets' own (composed here), so the table cannot drift from the configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stitching.build import CONF_DIR

PAGE = Path(__file__).resolve().parents[1] / "docs" / "protocols.md"


def stated_settings() -> list[tuple[str, str, str]]:
    """``(preset, key, value)`` for every setting in a protocol table's ``checked`` column."""
    found, in_table = [], False
    for line in PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table:  # a table's header: only tables whose last column is "checked" count
            in_table = cells[-1] == "checked"
            continue
        if line.startswith("|---"):
            continue
        checked = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
        for span in re.findall(r"`([^`]+)`", checked):
            preset, _, body = span.partition(":")
            for item in re.split(r",\s*(?=[\w.]+=)", body.strip()):
                key, _, value = item.partition("=")
                found.append((preset.strip(), key.strip(), value.strip()))
    return found


def test_the_protocol_tables_state_settings_to_check():
    settings = stated_settings()
    assert len(settings) >= 12 and {preset for preset, _, _ in settings} >= {"sanity", "ood", "grounding", "fig4", "fig5",
                                                                            "fig6", "fig8", "fig9", "fig10", "fig11",
                                                                            "lm_solu_gelu", "lm_pythia", "lm_bert_hans"}


@pytest.mark.parametrize(("preset", "key", "value"), stated_settings(), ids=lambda v: str(v))
def test_a_stated_value_is_the_presets_own(preset, key, value):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    if key.startswith("sweep."):
        params = dict(cfg.hydra.sweeper.params or {})
        assert str(params.get(key.removeprefix("sweep."))) == value, (preset, key, params)
        return
    actual = OmegaConf.select(cfg, key, default="<absent>")
    actual = OmegaConf.to_container(actual, resolve=True) if OmegaConf.is_config(actual) else actual
    assert actual == yaml.safe_load(value), (preset, key, actual)
