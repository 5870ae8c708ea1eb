"""One input contract for the Python API and the command line: every API argument is its
command-line setting's rule (cases generated from the rules, not listed), and every batch —
tensors handed in, a Dataset, the data modules — keeps the data contract or is one line."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch

import stitching
from stitching.errors import StitchingError
from stitching.validation import API_SETTINGS, RULES


def _bad_values(rule) -> list:
    """Values the rule must refuse: wrong types, NaN, just outside each bound, null when not allowed."""
    values = ["text", float("nan")] + (["maybe", 1] if rule.kind == "bool" else [])
    if rule.kind == "int":
        values.append(1.5)
    if rule.low is not None:
        values.append(rule.low if rule.low_open else (rule.low - 1 if rule.kind == "int" else rule.low - 1e-3))
    if rule.high is not None:
        values.append(rule.high * 10 + 1)
    if not rule.nullable:
        values.append(None)
    return values


ARGUMENT_CASES = [(name, value) for name, key in API_SETTINGS.items() for value in _bad_values(RULES[key])]


@pytest.mark.parametrize("name, value", ARGUMENT_CASES, ids=[f"{n}={v}" for n, v in ARGUMENT_CASES])
def test_every_api_argument_outside_its_settings_rule_is_one_line(name, value, pair):
    front, end, x, y = pair
    with pytest.raises(StitchingError, match=rf"^{name}=\S+ is out of range: it must be .* \(the command line's "):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), progress=False, **{name: value})


def _digits_cases(x, y):
    nan = x.clone()
    nan[3, 0, 2, 2] = math.nan
    return {
        "labels-out-of-range": ((x, y + 1), "labels lie in 1..10, outside the end model's classes 0..9"),
        "labels-negative": ((x, y - 1), "labels lie in -1..8"),
        "labels-float": ((x, y.float()), "labels are float32; give integer class indices"),
        "labels-one-hot": ((x, torch.nn.functional.one_hot(y, 10)), "one-hot? give labels.argmax(1)"),
        "images-3d": ((x[:, 0], y), "images must be a non-empty [N, C, H, W] tensor"),
        "images-nan": ((nan, y), "1 image value(s) are NaN or infinite"),
        "images-255": ((x * 255, y), "images in [0, 255]: divide by 255"),
        "images-normalised": ((x - 0.5, y), "give unnormalised images in [0, 1]"),
        "images-uint8": (((x * 255).to(torch.uint8), y), "images are uint8; give floating-point images in [0, 1] (uint8: divide by 255)"),
        "lengths": ((x, y[:50]), "96 inputs but 50 labels"),
    }


@pytest.mark.parametrize("case", ["labels-out-of-range", "labels-negative", "labels-float", "labels-one-hot", "images-3d",
                                  "images-nan", "images-255", "images-normalised", "images-uint8", "lengths"])
def test_data_breaking_the_contract_is_one_line_before_training(case, pair):
    front, end, x, y = pair
    data, message = _digits_cases(x, y)[case]
    with pytest.raises(StitchingError) as caught:
        stitching.stitch(front, end, 2, 2, objective="hint", train=data, epochs=1, progress=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    nan = x.clone()
    nan[-1, 0, 0, 0] = math.inf
    with pytest.raises(StitchingError, match="the test data break the input contract: 1 image value"):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), test=(nan, y), progress=False)
    with pytest.raises(StitchingError, match="the test data are empty"):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), test=(x[:0], y[:0]), progress=False)


def test_a_bad_batch_read_mid_epoch_from_a_dataset_is_one_line(pair):
    front, end, x, y = pair

    class Late(torch.utils.data.Dataset):  # its last items carry a label the end model does not have
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], (y[i] if i < 64 else torch.tensor(12))

    with pytest.raises(StitchingError, match="the training data break the input contract: labels lie in .*12"):
        stitching.stitch(front, end, 2, 2, objective="tlm", train=Late(), test=(x, y), batch_size=32,
                         progress=False, trainer={"accelerator": "cpu"})


def test_token_data_keep_the_vocabulary(pair):
    from tests.test_language import VOCAB, tiny

    front, end = tiny("llama", seed=0), tiny("llama", seed=1)
    ids = torch.randint(1, VOCAB, (16, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(StitchingError, match=rf"token ids lie in \d+\.\.{VOCAB + 4}, outside the vocabulary 0\.\.{VOCAB - 1}"):
        stitching.stitch(front, end, 2, 2, objective="dm", train=ids + 5, progress=False)
    with pytest.raises(StitchingError, match="token ids are float32; give integer ids"):
        stitching.stitch(front, end, 2, 2, objective="dm", train={"input_ids": ids.float()}, progress=False)
    with pytest.raises(StitchingError, match=r"the attention mask must hold 0 \(padding\) and 1"):
        stitching.stitch(front, end, 2, 2, objective="dm", train={"input_ids": ids, "attention_mask": ids % 3},
                         progress=False)


@pytest.mark.parametrize("trainer, message", [
    ({"precision": "64-true"}, "trainer.precision=64-true is not supported"),
    ({"limit_train_batches": 0}, "trainer={'limit_train_batches': 0} is out of range"),
    ({"max_steps": "many"}, "trainer={'max_steps': 'many'} is out of range"),
])
def test_the_apis_trainer_settings_keep_the_command_lines_rules(trainer, message, pair):
    front, end, x, y = pair
    with pytest.raises(StitchingError, match=re.escape(message)):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), progress=False, trainer=trainer)


def test_dm_samples_above_the_data_are_said_and_all_data_used(tiny_config, tmp_path, capsys):
    from stitching.runs import run

    record = run(tiny_config("objective=dm", "stitch.dm_samples=100000", "dataset.train_subset=200"), tmp_path / "r")
    err = capsys.readouterr().err
    assert "[data] stitch.dm_samples=100000 but the training split has 200 examples: DM is fitted on all of them" in err
    assert record["status"] == "ok"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.double(), "the front model's weights are float64; give a float32 model"),
    (lambda m: m.half(), "the front model's weights are float16"),
    (lambda m: m.to("meta"), "the front model has no weights (it is on the meta device)"),
    (lambda m: "a model", "the front model is a str, not a torch.nn.Module"),
], ids=["double", "half", "meta", "not-a-module"])
def test_a_model_off_the_weights_contract_is_one_line(change, message, pair):
    front, end, x, y = pair
    with pytest.raises(StitchingError, match=re.escape(message)):
        stitching.stitch(change(timm.create_model("test_resnet", num_classes=10)), end, 2, 2, objective="hint",
                         train=(x, y), progress=False)
