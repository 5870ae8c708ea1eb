"""Every paper preset composes; every CPU-sized preset runs as a (shrunken) sweep and draws its figure."""

import pytest
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir

from stitching.report import report
from stitching.results.records import collect
from stitching.build import CONF_DIR
from tests.conftest import compose_config, train_cli
from tests.test_cli import _train

#: presets of `python -m stitching.grounding` and `python -m stitching.claims` (not sweeps; their
#: shrunken pipelines run in test_grounding and test_claims)
GROUNDING = ("grounding", "grounding_small")
CLAIMS = ("claims", "claims_cpu", "claims_small")
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                 if p.stem not in ("small", *GROUNDING, *CLAIMS))

# tiny stand-ins for each CPU preset's axes: same kinds of sweep, a few cells
SHRINK = {
    "fig3_small": (["stitch.layer=1,9", "stitch.dm_samples=16"], "stitching_plot.png"),
    "fig4_small": (["stitch.layer=8", "attack.alpha=0,1", "end.robust=false,true", "objective=fula"],
                   "stitching_plot_robust_acc_pgd.png"),
    "fig5_small": (["stitch.layer=8", "end.robust=false,true", "objective=tlm"], "stitching_plot_robust_acc_pgd.png"),
    "fig6_small": (["stitch.layer=8", "end.robust=false,true"], "stitching_plot_penultimate_cka.png"),
    "fig8_small": (["stitch.layer=1,9", "shortcut.placement=pattern,both", "objective=dm,tlm"],
                   "stitching_plot_acc_shortcut.png"),
    "fig9_small": (["dataset.num_classes_train=1,5", "objective=dm,tlm"], "subsets.png"),
    "fig10_small": (["stitch.front_layer=1,9", "stitch.end_layer=1,9", "objective=hint,tlm"], "heatmap.png"),
    "fig11_small": (["stitch.front_layer=1,9", "stitch.end_layer=1,9", "objective.weights=first,uniform"],
                    "heatmap.png"),
    "sanity_small": (["stitch.front_layer=1,9", "stitch.end_layer=1,9", "objective=dm,tlm", "end.seed=0,1"],
                     "sanity.md"),
    "sanity_vit_small": (["stitch.front_layer=1,6", "stitch.end_layer=1,6", "objective=hint", "end.seed=0"],
                         "sanity.md"),
    "ood_small": (["stitch.layer=1,9", "objective=dm,tlm", "evaluation.ood.epochs=1", "evaluation.ood.pretrain_epochs=1",
                   "evaluation.ood.width=4", "evaluation.ood.train_images=400",
                   "evaluation.ood.eval_images=50"], "stitching_plot_ood_auroc.png"),
    "demo": (["stitch.layer=1,9", "objective=dm,hint"], "stitching_plot.png"),
    "lm_solu_gelu_small": (["stitch.layer=2", "front.seed=0", "end.seed=1", "objective=dm"], "penalty.png"),
}
#: language-model presets shrink their own way (the image stand-ins do not apply)
TINY_TEXT = ["model.width=16", "model.depth=1", "zoo.recipe.language.tokens=4096", "dataset.train_sequences=32",
             "dataset.test_sequences=8", "logger=none"]
TINY_PRESET = ["dataset=digits", "model.width=4", "zoo.recipe.epochs=1", "trainer.limit_train_batches=2",
               "attack.eval_images=16", "front.dataset=digits", "dataset.base_images=null", "logger=none",
               "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_its_sweep(preset):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    from stitching import LAYER_KEYS
    from stitching.train import with_default_layer_sweep

    params = dict(cfg.hydra.sweeper.params or {})
    added = with_default_layer_sweep(["-m", f"experiment={preset}"])[2:]  # the nine layers, unless named
    assert (set(params) | {arg.split("=")[0] for arg in added}) & set(LAYER_KEYS), preset
    fixed = ("fig6", "fig6_small", "fig11", "fig11_small", "demo", "lm_solu_gelu", "lm_solu_gelu_small", "lm_minilm",
             "lm_smollm2", "lm_bert_hans", "lm_pythia")  # their objective is fixed (lm_pythia: a similarity preset)
    assert "objective" in params or preset in fixed


@pytest.mark.parametrize("preset", GROUNDING)
def test_grounding_presets_compose_with_valid_settings(preset):
    from stitching.build import read_settings
    from stitching.groundings import _settings

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"])
    settings = _settings(read_settings(cfg))
    assert settings["tests"] == ["sensitivity", "specificity"] and settings["objectives"] == ["dm", "hint", "fula", "tlm"]
    assert cfg.front.arch == cfg.end.arch and cfg.logger.kind == "none"


@pytest.mark.parametrize("preset", CLAIMS)
def test_claims_presets_compose_with_valid_settings_and_plan_every_claim(preset):
    from stitching.claims import BERT_PAIRS, CLAIMS as ALL_CLAIMS, plan, unavailable
    from stitching.validation import check_config

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"])
    check_config(cfg)
    assert cfg.claims.seed_pairs >= cfg.claims.min_pairs == 3 and cfg.logger.kind == "none"
    # pre-registered in the preset itself, not inherited: replicates and the test's level
    preset_file = OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml")
    assert preset_file.claims.seed_pairs == 3 and preset_file.claims.min_pairs == 3 and preset_file.claims.alpha == 0.05
    jobs = plan(cfg.claims, list(ALL_CLAIMS))
    # every claim planned but those on pretrained hub models: offline, not run (said in the report); at paper size
    # the Pythia pairs, and the BERT groups once their candidates are ranked (the claims' first step)
    hub = {"bert_groups"} if preset == "claims" else {"bert_groups", "pythia"}
    assert {j.experiment for j in jobs} == {claim.experiment for claim in ALL_CLAIMS.values()} - hub
    assert {e for e in hub if unavailable(e, cfg.claims)} == hub
    if preset == "claims":  # the paper's Pythia protocol: minibatch CKA over token positions, 2.8B beside 1B–6.9B
        pythia = [j for j in jobs if j.experiment == "pythia"]
        assert any("2.8b" in o for j in pythia for o in j.overrides) and any("6.9b" in o for j in pythia for o in j.overrides)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            lm = compose("config", overrides=list(pythia[0].overrides))
        assert (lm.similarity.index, lm.similarity.flatten, lm.dataset.corpus) == \
            ("minibatch_cka", "positions", "NeelNanda/pile-10k")
        assert len(cfg.claims.bert.candidates) >= 2 * 2 * cfg.claims.seed_pairs
        # the BERT jobs once ranked (here: any twelve candidates as the two groups) compose as the paper's Sec. 4:
        # MNLI, the classifier's own loss, every residual stream of BERT-base, minibatch CKA over token positions
        ranked = OmegaConf.merge(cfg.claims, {"bert": {"generalising": list(cfg.claims.bert.candidates[:6]),
                                                       "heuristic": list(cfg.claims.bert.candidates[6:12])}})
        bert = {j.tag: j for j in plan(ranked, ["bert_across_cka", "bert_later_stitching"]) if j.pair == (0, 1)}
        assert sorted(bert) == sorted([*(t for t, _, _ in BERT_PAIRS), *(f"cka_{t}" for t, _, _ in BERT_PAIRS)])
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            grid = compose("config", overrides=list(bert["between_gh"].overrides))
            cka = compose("config", overrides=list(bert["cka_between_gh"].overrides))
        assert (grid.dataset.name, grid.objective.name, grid.dataset.train_sequences) == ("mnli", "tlm", 20000)
        assert [list(p) for p in grid.grid.pairs] == [[k, k] for k in range(1, 14)]
        assert (grid.front.name, grid.end.name) == (ranked.bert.generalising[0], ranked.bert.heuristic[1])
        assert (cka.similarity.index, cka.similarity.flatten, list(cka.similarity.layers)) == \
            ("minibatch_cka", "positions", list(range(1, 14)))
    language = next(j for j in jobs if j.experiment == "language")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # the language runs compose on their own
        lm = compose("config", overrides=list(language.overrides))
    assert lm.dataset.kind == "text" and {lm.front.arch, lm.front.name} & set(cfg.claims.language_models)
    # the Ding et al. claims: the grounding preset's protocol (grounding_small's size in the CPU twin), TLM from a
    # random map and front and end in eval mode, as the TLM-vs-DM authors' stitching script
    twin = OmegaConf.load(CONF_DIR / "experiment" / ("grounding.yaml" if preset == "claims" else "grounding_small.yaml"))
    for job in (j for j in jobs if j.experiment == "grounding"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            run = compose("config", overrides=[f"experiment={preset}", *job.overrides])
        assert [run.grounding[k] for k in ("layers", "ranks", "compare_layers")] == \
            [twin.grounding[k] for k in ("layers", "ranks", "compare_layers")]
        assert run.stitch.update_bn is False and run.stitch.weight_decay == 1e-5
        assert (run.stitch.init, list(run.grounding.objectives)) == (("random", ["tlm"]) if job.tag == "tlm_random"
                                                                     else ("dm", ["dm"]))


def test_every_cpu_preset_has_a_paper_sized_twin():
    small = [p for p in PRESETS if p.endswith("_small")]
    assert small and all(p.removesuffix("_small") in PRESETS for p in small)
    assert all(p.removesuffix("_small") in CLAIMS + GROUNDING for p in CLAIMS + GROUNDING)
    assert set(SHRINK) == set(small) | {"demo"}


#: their shrunken sweeps repeat what a fast preset already exercises (PGD testbeds: fig4_small;
#: ViT grids: the ViT tests; layer grids and their sanity checks: fig10_small and the grid tests);
#: they run with the slow tests to keep CI well under 20 minutes
SLOW_PRESETS = {"fig5_small", "fig6_small", "sanity_vit_small", "sanity_small"}


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS else p
                                    for p in sorted(SHRINK)])
def test_cpu_preset_runs_as_a_sweep_and_draws_its_figure(tmp_path, zoo_dir, preset, monkeypatch, capsys):
    overrides, figure = SHRINK[preset]
    sweep = tmp_path / "sweep"
    if preset.startswith("lm_"):  # in this process: the image stand-ins of _train do not apply to text
        code, output = train_cli(["-m", f"experiment={preset}", *TINY_TEXT, *overrides, f"paths.zoo_dir={tmp_path / 'zoo'}",
                                  f"paths.output_dir={tmp_path}", f"hydra.sweep.dir={sweep}"], monkeypatch, capsys)
        assert code == 0, output[-3000:]
    else:
        result = _train(tmp_path, tmp_path / "zoo", f"experiment={preset}", *TINY_PRESET, *overrides,
                        f"hydra.sweep.dir={sweep}", multirun=True)
        assert result.returncode == 0, result.stderr[-3000:]
    frame, failed = collect(sweep)
    assert not failed, failed
    made = report(sweep)
    assert (sweep / figure).is_file(), sorted(p.name for p in sweep.iterdir())
    assert len(frame) >= 2 and made["results"].is_file()


@pytest.mark.parametrize("preset", ["sanity", "sanity_small", "sanity_vit", "sanity_vit_small", "ood", "ood_small",
                                    "grounding", "grounding_small"])
def test_the_tlm_vs_dm_presets_start_tlm_as_the_authors_and_keep_the_other_start_beside(preset):
    """The authors' code starts TLM from a random map (--init rand): the paper presets do, and `make`
    runs the DM start beside them (stitch.start.tlm=dm). The CPU twins start TLM at DM (a random
    start does not converge in their one epoch; the preset says so) and take the authors' start
    as stitch.start.tlm=random. The other objectives start at DM everywhere."""
    twin = preset.endswith("_small")
    starts = {objective: compose_config(f"experiment={preset}", f"objective={objective}").stitch.init
              for objective in ("dm", "hint", "fula", "tlm")}
    assert starts == {"dm": "dm", "hint": "dm", "fula": "dm", "tlm": "dm" if twin else "random"}
    other = "random" if twin else "dm"
    assert compose_config(f"experiment={preset}", "objective=tlm", f"stitch.start.tlm={other}").stitch.init == other


def _make_default(name: str) -> list[str]:
    """A Makefile variable's default list (``NAME ?= a b c``)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    return re.search(rf"^{name} \?= (.+)$", text, re.M).group(1).split()


def test_appendix_b_runs_the_papers_figures_for_its_other_architectures():
    """FuLA App. B (Figs. 13-30): the figures of adversarial, shortcut, class-subset and cross-layer
    stitching again for "ResNet18 (w/o residuals)" and "ResNet34", width 64, each with "9 stitching
    locations for all architectures"; the CPU twin (App. B.4's grids) at width 16 on MNIST-5k."""
    from stitching.models import build_model

    models, figures = _make_default("APPENDIX_B_MODELS"), _make_default("APPENDIX_B_FIGURES")
    assert set(models) == {"resnet18_nores", "resnet34"}
    assert set(figures) == {"fig4", "fig5", "fig8", "fig9", "fig10"}
    for model in models:
        assert len(build_model(model, num_classes=10, width=8).cut_points) == 9
        for figure in figures:
            cfg = compose_config(f"experiment={figure}", f"model={model}")
            assert cfg.front.arch == cfg.end.arch == model and cfg.front.width == cfg.end.width == 64
            assert cfg.dataset.name == "cifar10" and cfg.trainer.max_epochs == 30
        # as make appendix-b-small runs it: fig10_small's self grid on MNIST-5k
        small = compose_config("experiment=fig10_small", f"model={model}", "model.width=16", "dataset=mnist5k",
                               "dataset.base_images=null", "front.dataset=mnist5k")
        assert small.front.arch == model and small.front.width == 16 and small.dataset.name == "mnist5k"
        assert small.front.dataset == "mnist5k" and small.dataset.base_images is None
    assert "dataset=mnist5k dataset.base_images=null front.dataset=mnist5k" in (CONF_DIR.parents[1] / "Makefile").read_text()


def test_the_papers_base_models_are_set_beside_table_1():
    """FuLA Table 1: cifar10_0 ResNet18 94.51 %, cifar10_1 ResNet34 robust 86.22 % / 42.86 %; a model
    of another width or one the table does not list is not compared."""
    import pandas as pd

    from stitching.results.paper import table_1

    def side(prefix, model, dataset, arch, seed, robust, acc, autoattack=None):
        return {f"{prefix}_model": model, f"{prefix}_dataset": dataset, f"{prefix}_arch": arch, f"{prefix}_seed": seed,
                f"{prefix}_robust": robust, f"{prefix}_acc": acc, f"{prefix}_robust_acc_autoattack": autoattack}

    frame = pd.DataFrame([
        {**side("front", "resnet18-w64-cifar10-s0-e200-aa", "cifar10", "resnet18", 0, False, 0.93),
         **side("end", "resnet34-w64-cifar10-s1-e200-robust-bb", "cifar10", "resnet34", 1, True, 0.86, 0.40)},
        {**side("front", "resnet18-w16-cifar10-s0-e200-cc", "cifar10", "resnet18", 0, False, 0.90),  # not the paper's width
         **side("end", "resnet18-w64-mnist5k-s1-e200-dd", "mnist5k", "resnet18", 1, False, 0.99)},  # not in the table
    ])
    compared = table_1(frame).set_index("model")
    assert list(compared.index) == ["resnet18-w64-cifar10-s0-e200-aa", "resnet34-w64-cifar10-s1-e200-robust-bb"]
    first, robust = compared.iloc[0], compared.iloc[1]
    assert first.paper_acc == 0.9451 and first.acc_diff == pytest.approx(0.93 - 0.9451) and pd.isna(first.robust_diff)
    assert (robust.paper_acc, robust.paper_robust_acc) == (0.8622, 0.4286)
    assert robust.robust_diff == pytest.approx(0.40 - 0.4286)
    assert table_1(frame.iloc[1:]).empty
