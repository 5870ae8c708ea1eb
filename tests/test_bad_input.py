"""The bad-input battery: every mistake a user can make ends in one line and a non-zero
exit, with no traceback and no ``ok`` record; never a silent answer.

The entry points run in this process (as ``python -m …`` would run them) so the battery
stays fast; ``tests/test_cli.py`` runs the same entry points as subprocesses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import TINY, train_cli

# (id, overrides, the start of the expected error)
TRAIN_CASES = [
    ("groups-by", ["groups.by=seed"], "groups.by=seed is out of range: it must be name or arch"),
    ("groups-one", ["groups.members={a:[x]}"], "groups.members needs at least two groups"),
    ("groups-shared", ["groups.members={a:[x],b:[x]}"], "groups.members: x is in both a and b"),
    ("claims-confirm-seed", ["claims.confirm_seed=5"], "claims.confirm_seed=5 is a seed the other claims use (0 to 5"),
    ("claims-adversarial-images", ["claims.adversarial_images=0"], "claims.adversarial_images=0 is out of range"),
    ("claims-margin", ["claims.margins.accuracy=-1"], "claims.margins.accuracy=-1 is out of range"),
    ("claims-grounding-rank", ["claims.grounding.ranks=[0,2]"], "claims.grounding.ranks=[0, 2] is out of range: give a "
     "non-empty list of ranks"),
    ("claims-grounding-stitch", ["claims.grounding.stitch=nope"], "claims.grounding.stitch=nope is out of range: give "
     "a list of overrides"),
    ("claims-language", ["claims.language=[experiment]"], "claims.language=['experiment'] is out of range"),
    ("claims-grounding-layers", ["claims.grounding.layers=[]"], "claims.grounding.layers=[] is out of range"),
    ("cross-front", ["claims.cross_front=nope"], "claims.cross_front=nope is not a dataset preset"),
    ("lr-huge", ["stitch.lr=1e12"], "stitch.lr=1000000000000.0 is out of range: it must be a finite number in (0, 10]"),
    ("accumulate-zero", ["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is out of range"),
    ("clip-negative", ["+trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is out of range"),
    ("clip-algorithm", ["+trainer.gradient_clip_algorithm=l1"], "trainer.gradient_clip_algorithm=l1 is out of range"),
    ("max-steps-text", ["+trainer.max_steps=many"], "trainer.max_steps=many is out of range"),
    ("lr-inf", ["stitch.lr=inf"], "stitch.lr=inf is out of range"),
    ("lr-negative", ["stitch.lr=-1"], "stitch.lr=-1 is out of range"),
    ("lr-text", ["stitch.lr=fast"], "stitch.lr=fast is out of range"),
    ("weight-decay-nan", ["stitch.weight_decay=nan"], "stitch.weight_decay=nan is out of range"),
    ("fula-weights-nan", ["objective=fula", "objective.weights=[1,nan,1,1,1]"], "objective.weights=[1, nan, 1, 1, 1]"),
    ("fula-weights-inf", ["objective=fula", "objective.weights=[1,inf,1,1,1]"], "objective.weights=[1, inf, 1, 1, 1]"),
    ("fula-weights-negative", ["objective=fula", "objective.weights=[1,-1,1,1,1]"], "objective.weights=[1, -1, 1"),
    ("fula-weights-word", ["objective=fula", "objective.weights=most"], "objective.weights='most' is not understood"),
    ("dm-samples-zero", ["stitch.dm_samples=0"], "stitch.dm_samples=0 is out of range: it must be an integer ≥ 1"),
    ("dm-samples-negative", ["stitch.dm_samples=-5"], "stitch.dm_samples=-5 is out of range"),
    ("eps-negative", ["attack=pgd", "attack.eps=-1"], "attack.eps=-1 is out of range: it must be a finite number in [0, 1]"),
    ("alpha-above-one", ["attack.alpha=1.5"], "attack.alpha=1.5 is out of range"),
    ("pgd-steps-zero", ["attack=pgd", "attack.steps=0"], "attack.steps=0 is out of range"),
    ("epochs-negative", ["trainer.max_epochs=-3"], "trainer.max_epochs=-3 is out of range: it must be an integer ≥ 0"),
    ("limit-batches-zero", ["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 is out of range"),
    ("batch-size-zero", ["dataset.batch_size=0"], "dataset.batch_size=0 is out of range"),
    ("workers-negative", ["dataset.num_workers=-1"], "dataset.num_workers=-1 is out of range"),
    ("classes-train-zero", ["dataset.num_classes_train=0"], "dataset.num_classes_train=0 is out of range"),
    ("seed-negative", ["seed=-1"], "seed=-1 is out of range"),
    ("flag-not-bool", ["stitch.update_bn=maybe"], "stitch.update_bn=maybe is out of range: it must be true or false"),
    ("robust-not-bool", ["front.robust=yes"], "front.robust=yes is out of range"),
    ("zoo-epochs-zero", ["zoo.recipe.epochs=0"], "zoo.recipe.epochs=0 is out of range"),
    ("self-baseline-word", ["evaluation.self_baseline=maybe"], "evaluation.self_baseline=maybe is out of range"),
    ("self-baseline-images", ["evaluation.self_baseline=true"], "evaluation.self_baseline=true applies to language models"),
    ("ood-images-zero", ["evaluation.ood.enabled=true", "evaluation.ood.eval_images=0"], "evaluation.ood.eval_images=0"),
    ("accelerator", ["trainer.accelerator=tpu"], "Lightning refuses the trainer settings"),
    ("devices-zero", ["trainer.devices=0"], "Lightning refuses the trainer settings"),
    ("precision", ["trainer.precision=13"], "trainer.precision=13 is not supported"),
    ("unknown-trainer-key", ["+trainer.warp_speed=9"], "unknown trainer setting(s) ['warp_speed']"),
    ("seed-beyond-numpy", ["seed=4294967296"], "seed=4294967296 is out of range: it must be an integer in [0, 4294967295]"),
    ("split-seed-negative", ["dataset.source.split_seed=-1"], "dataset.source.split_seed=-1 is out of range"),
    ("test-fraction-one", ["dataset.source.test_fraction=1"], "dataset.source.test_fraction=1 is out of range: it must be "
                                                              "a finite number in (0, 1)"),
    ("test-fraction-zero", ["dataset.source.test_fraction=0"], "dataset.source.test_fraction=0 is out of range"),
    ("test-fraction-negative", ["dataset.source.test_fraction=-0.5"], "dataset.source.test_fraction=-0.5 is out of range"),
    ("image-size-zero", ["dataset.source.image_size=0"], "dataset.source.image_size=0 is out of range"),
    ("precision-64", ["trainer.precision=64-true"], "trainer.precision=64-true is not supported"),
    ("limit-rounds-to-zero", ["trainer.limit_train_batches=0.001"], "trainer.limit_train_batches=0.001 leaves none of the"),
    ("limit-test-rounds-to-zero", ["trainer.limit_test_batches=0.01"], "trainer.limit_test_batches=0.01 leaves none of"),
    ("skip-positions-on-images", ["similarity.skip_positions=2"], "similarity.skip_positions=2 applies to token sequences"),
    ("layer-out-of-range", ["stitch.layer=10"], "layer 10 is out of range: this model has cut points 1..9"),
    ("layer-unknown-name", ["stitch.front_layer=layer9.0"], "unknown layer 'layer9.0'"),
    ("class-token", ["stitch.class_token=both"], "unknown stitch.class_token 'both'"),
    ("init-unknown", ["stitch.init=pinv"], "unknown stitch.init 'pinv'; choose one of dm, identity, random"),
    ("init-of-dm", ["objective=dm", "stitch.init=identity"], "objective dm is the DM solution itself"),
    ("stitch-kind", ["stitch.kind=deep"], "unknown stitch.kind 'deep'; choose one of affine, low_rank, mlp"),
    ("low-rank-without-rank", ["stitch.kind=low_rank"], "stitch.kind=low_rank needs stitch.rank"),
    ("front-rank-zero", ["stitch.front_rank=0"], "stitch.front_rank=0 is out of range"),
    ("pretrained-builtin", ["front.pretrained=true"], "front.pretrained=true applies to timm and torchvision"),
    ("timm-name", ["front.arch=timm", "front.name=resnet18x"], "timm has no model 'resnet18x'"),
    ("missing-checkpoint", ["front.checkpoint=/nonexistent/model.pt"], "checkpoint /nonexistent/model.pt does not exist"),
    ("unreadable-checkpoint", ["front.checkpoint=@garbage"], "cannot be read as a PyTorch or safetensors file"),
    ("cifar-offline", ["dataset=cifar10", "dataset.source.download=false"], "CIFAR-10 not found in"),
    ("incompatible-pair", ["front.arch=vit_tiny", "front.width=16", "front.depth=4", "front.seed=7", "stitch.layer=2"],
     "cannot stitch a tokens [N, T, D] (1 prefix, 4×4 patches) to a conv map"),
    ("output-folder", ["hydra.run.dir=@file/run"], "a-file is a file, so the folder"),
]


def _assert_one_clean_line(code: int, output: str, expected: str) -> None:
    assert code != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-2000:]
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("overrides, expected", [case[1:] for case in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_input_in_one_line(overrides, expected, tmp_path, zoo_dir, monkeypatch, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    overrides = [o.replace("@garbage", str(garbage)).replace("@file", str(blocker)) for o in overrides]
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in zoo_dir.glob("*.pt"))
    code, output = train_cli([*TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}",
                           f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", *overrides],
                          monkeypatch, capsys)
    _assert_one_clean_line(code, output, expected)
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert all(r["status"] != "ok" for r in records)  # a refused run never leaves a result
    new = sorted(set(p.name for p in zoo_dir.glob("*.pt")) - set(before))
    assert not [name for name in new if "vit" in name]  # an incompatible pair trains nothing first


SIMILARITY_CASES = [
    ("images-zero", ["--images", "0"], "--images 0 is out of range: it must be an integer ≥ 4"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    ("batch-size-negative", ["--batch-size", "-1"], "--batch-size -1 is out of range"),
    ("layers-unknown", ["--layers", "abc"], "unknown layer 'abc'"),
    ("index-unknown", ["--index", "cosine"], "unknown index 'cosine'"),
]


@pytest.mark.parametrize("flags, expected", [c[1:] for c in SIMILARITY_CASES], ids=[c[0] for c in SIMILARITY_CASES])
def test_similarity_refuses_bad_flags_in_one_line(flags, expected, tmp_path, zoo_dir, capsys):
    from stitching.similarity.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([*flags, "--out", str(tmp_path / "sim"), "--no-progress", *TINY, f"paths.zoo_dir={zoo_dir}",
              f"paths.data_dir={tmp_path / 'data'}"])
    captured = capsys.readouterr()
    _assert_one_clean_line(exit_.value.code, captured.err + captured.out, expected)
    assert not (tmp_path / "sim" / "similarity.json").exists()


def _ok(**changes):
    """A well-formed ``ok`` record with ``changes`` made to it."""
    record = {"status": "ok", "objective": "dm", "front_layer": 1, "end_layer": 1, "timings": {"total_s": 1},
              "metrics": {"test/acc": 0.5}, "base": {"front": {"test_acc": 1, "key": "f"}, "end": {"test_acc": 1, "key": "e"}},
              "config": {"seed": 0}}
    return {**record, **changes}


REPORT_CASES = [
    ("a-list", [1, 2, 3], "malformed results.json (a list, not a record)"),
    ("no-metrics", {"status": "ok", "objective": "dm", "front_layer": 1, "end_layer": 1, "base": {}},
     "invalid results.json: no metrics; base.front names no model; base.end names no model (+2 more)"),
    ("empty-metrics", _ok(metrics={}), "invalid results.json: no metrics"),
    ("nan-metric", _ok(metrics={"test/acc": float("nan")}), "invalid results.json: metric test/acc = nan is not a finite"),
    ("accuracy-5", _ok(metrics={"test/acc": 5.0}), "invalid results.json: metric test/acc = 5.0 is a share outside [0, 1]"),
    ("accuracy-true", _ok(metrics={"test/acc": True}), "invalid results.json: metric test/acc = True is not a finite"),
    ("accuracy-text", _ok(metrics={"test/acc": "0.9"}), "invalid results.json: metric test/acc = '0.9' is not a finite"),
    ("base-accuracy-2", _ok(base={"front": {"test_acc": 2, "key": "f"}, "end": {"test_acc": 1, "key": "e"}}),
     "invalid results.json: metric base.front.test_acc = 2 is a share outside [0, 1]"),
    ("layer-negative", _ok(front_layer=-1), "invalid results.json: front_layer = -1 is not a cut point"),
    ("layer-text", _ok(end_layer="3"), "invalid results.json: end_layer = '3' is not a cut point"),
    ("objective-unknown", _ok(objective="magic"), "invalid results.json: objective 'magic' is not one of dm"),
    ("no-timings", _ok(timings={}), "invalid results.json: timings.total_s is not a duration"),
    ("edited-config", _ok(config={"seed": 1}, config_hash="0" * 16),
     "invalid results.json: its config does not hash to its config_hash"),
    ("not-json", "{", "unreadable results.json"),
]


@pytest.mark.parametrize("content, expected", [c[1:] for c in REPORT_CASES], ids=[c[0] for c in REPORT_CASES])
def test_report_over_broken_records_is_one_line(content, expected, tmp_path, capsys):
    from stitching.report import main

    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    captured = capsys.readouterr()
    _assert_one_clean_line(exit_.value.code, captured.err + captured.out, expected)


def test_user_directed_additions_are_accepted(tiny_config):
    """``+key=value`` adds a key the project does not read; it is the user's own note and runs."""
    from stitching.build import read_settings

    assert read_settings(tiny_config("+notes.purpose=trial")).stitch.lr is None  # null: the objective's default


def test_every_rule_names_a_key_the_config_has():
    """A rule for a key no config defines would check nothing (a trainer setting a user adds with
    ``+trainer.…`` counts when the trainer builder accepts it)."""
    from stitching.runtime import _TRAINER_KEYS
    from stitching.validation import RULES
    from tests.conftest import compose_config

    composed = [compose_config(), compose_config("attack=pgd", "shortcut=aruco"), compose_config("dataset=pydoc"),
                compose_config("dataset=ls_imagenet10")]
    for key in RULES:
        addable = key.startswith("trainer.") and key.removeprefix("trainer.") in _TRAINER_KEYS
        assert addable or any(_has(cfg, key) for cfg in composed), key


def _has(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="<absent>") != "<absent>"


def test_rules_accept_the_shipped_presets():
    from stitching.validation import check_config
    from tests.conftest import compose_config

    for preset in sorted(Path(__file__).resolve().parent.parent.joinpath("stitching/conf/experiment").glob("*.yaml")):
        check_config(compose_config(f"experiment={preset.stem}"))


def _inapplicable_cases():
    """Every setting of the applicability table, set where the run does not read it: the
    stitch-kind settings on the default affine stitch, the image-only ones on a language model."""
    from stitching.validation import APPLIES
    from tests.test_language_runs import LM_TINY

    cases = []
    for rule in APPLIES:
        context = LM_TINY if "image" in rule.only else TINY
        cases.append(pytest.param([*context, rule.example], rule, id=rule.key))
    return cases


@pytest.mark.parametrize("overrides, rule", _inapplicable_cases())
def test_a_setting_given_where_it_does_not_apply_is_refused(overrides, rule, tmp_path):
    from stitching.build import read_settings
    from stitching.errors import StitchingError
    from tests.conftest import compose_config

    with pytest.raises(StitchingError, match=rf"^{re.escape(rule.key)}=\S+ applies to {re.escape(rule.only)} only; this run "
                                             rf"would ignore it"):
        read_settings(compose_config(*overrides, f"paths.output_dir={tmp_path}"))
    applicable = {"stitch.rank": ["stitch.kind=low_rank"], "stitch.hidden": ["stitch.kind=mlp"]}.get(rule.key)
    if applicable:  # and where it applies, it is read
        read_settings(compose_config(*TINY, rule.example, *applicable, f"paths.output_dir={tmp_path}"))


def test_a_record_copied_into_another_cells_folder_is_named_not_tabled(tmp_path):
    from stitching.results.records import collect

    for objective, cell in [("dm", "f1-e2"), ("hint", "f1-e1"), ("dm", "f1-e1")]:
        (tmp_path / objective / cell).mkdir(parents=True)
        (tmp_path / objective / cell / "results.json").write_text(json.dumps(_ok()))
    frame, failed = collect(tmp_path)
    assert list(frame.run) == ["dm/f1-e1"]
    assert failed == [
        {"run": "dm/f1-e2", "error": "invalid results.json: it records layers f1-e1 in the folder of cell f1-e2 "
                                     "(copied from another cell?)"},
        {"run": "hint/f1-e1", "error": "invalid results.json: it records objective dm in the hint grid's folder"}]


def test_a_sweep_cell_whose_record_is_not_its_own_is_named(tmp_path, capsys):
    from stitching.results.records import collect

    for cell, layer in (("0", 3), ("1", 5)):
        folder = tmp_path / cell
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(f"seed: 0\nstitch:\n  layer: {layer}\n  lr: ${{oc.env:LR}}\n")
        (folder / "results.json").write_text(json.dumps(_ok(config={"seed": 0, "stitch": {"layer": 3, "lr": 0.1}})))
    frame, failed = collect(tmp_path)
    assert list(frame.run) == ["0"]
    assert failed == [{"run": "1", "error": "invalid results.json: its config is not its folder's "
                                            "(stitch.layer: 3 recorded, 5 in 1's config)"}]


def test_a_launcher_that_runs_no_job_is_one_line(tmp_path, zoo_dir, monkeypatch, capsys):
    code, output = train_cli(["-m", *TINY, f"paths.zoo_dir={zoo_dir}", "stitch.layer=2,3", "hydra/launcher=local",
                              "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"], monkeypatch, capsys)
    _assert_one_clean_line(code, output, "hydra.launcher.n_jobs=0 runs no job")
    assert not list(tmp_path.rglob("results.json"))
