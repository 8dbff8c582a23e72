# vtn-tf: common tasks. Data come from VTN_DATA (default ../shared/data).
PYTHON ?= python3
VTN_DATA ?= $(abspath ../shared/data)
PREPARED ?= prepared
RUNS ?= runs
# FULL=1 selects the paper's full configs (128^3, full width, 100k steps: a GPU job).
FULL ?=
# Real liver CT: LIVER_DATA=/path/to/LiTS (LIVER_LAYOUT=lits) or SLIVER07 (LIVER_LAYOUT=sliver07).
LIVER_DATA ?=
LIVER_LAYOUT ?= lits
SET ?=
export VTN_DATA

.PHONY: help install demo test test-all bench-call demo train-brain train-liver train-hippocampus tune-hippocampus tensorboard bench clean-runs accuracy-hippocampus accuracy-brain ablation-hippocampus ablation-brain native-tables evaluate-brain evaluate-hippocampus accuracy-brain-labels accuracy-brain-labels-deep accuracy-brain-labels-deeper accuracy-hippocampus-labels

help:
	@echo "make demo          install, train briefly on real data (or synthetic), evaluate, register, draw"
	@echo "make test          install and run the unit tests (make test-all: with the slow, real-data ones)"
	@echo "make train-brain   prepare LPBA40 and train (CPU scale; FULL=1 for the paper's ADD at 128^3)"
	@echo "make train-liver   prepare liver data and train (synthetic stand-in unless LIVER_DATA is set)"
	@echo "make tensorboard   watch the runs in $(RUNS)"
	@echo "make bench         speed tables (warp, inference, training)"
	@echo "make bench-call    one vtn-register call part by part, served and batch, beside ANTs and elastix"

# EXTRAS: the setup.py extras installed with the package (CI adds baselines).
EXTRAS ?= test,plot

install:
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"

# `make test` (CI): every unit test; the tests marked slow (trainings, real-data registrations)
# run with `make test-all`.
test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install
	$(PYTHON) -m pytest -q

# ---- data preparation ---------------------------------------------------------------
$(PREPARED)/hippocampus/manifest.json:
	$(PYTHON) -m data_prep --layout hippocampus --input $(VTN_DATA)/hippocampus --output $(PREPARED)/hippocampus --no-crop --grid 64 64 64 --overwrite

$(PREPARED)/lpba40-64/manifest.json:
	$(PYTHON) -m data_prep --layout lpba40 --input $(VTN_DATA)/lpba40 --output $(PREPARED)/lpba40-64 --grid 64 64 64 --overwrite

$(PREPARED)/lpba40-128/manifest.json:
	$(PYTHON) -m data_prep --layout lpba40 --input $(VTN_DATA)/lpba40 --output $(PREPARED)/lpba40-128 --grid 128 128 128 --overwrite

$(PREPARED)/liver-synthetic-64/manifest.json:
	$(PYTHON) -m data_prep --layout abdomen-synthetic --input $(VTN_DATA)/abdomen_ct_labels --output $(PREPARED)/liver-synthetic-64 --grid 64 64 64 --overwrite

$(PREPARED)/liver-synthetic-128/manifest.json:
	$(PYTHON) -m data_prep --layout abdomen-synthetic --input $(VTN_DATA)/abdomen_ct_labels --output $(PREPARED)/liver-synthetic-128 --grid 128 128 128 --overwrite

$(PREPARED)/liver/manifest.json:
	@test -n "$(LIVER_DATA)" || (echo "set LIVER_DATA=/path/to/liver/scans (LIVER_LAYOUT=lits|sliver07)"; exit 2)
	$(PYTHON) -m data_prep --layout $(LIVER_LAYOUT) --input $(LIVER_DATA) --output $(PREPARED)/liver --grid 128 128 128 --overwrite

# ---- training -----------------------------------------------------------------------
ifeq ($(FULL),)
BRAIN_CONFIG = experiments/brain-cpu.json
BRAIN_DATA = $(PREPARED)/lpba40-64/manifest.json
LIVER_CONFIG = experiments/liver-cpu.json
LIVER_MANIFEST = $(if $(LIVER_DATA),$(PREPARED)/liver/manifest.json,$(PREPARED)/liver-synthetic-64/manifest.json)
else
BRAIN_CONFIG = experiments/paper-brain-ADD.json
BRAIN_DATA = $(PREPARED)/lpba40-128/manifest.json
LIVER_CONFIG = experiments/paper-liver-ADDD-inv.json
LIVER_MANIFEST = $(if $(LIVER_DATA),$(PREPARED)/liver/manifest.json,$(PREPARED)/liver-synthetic-128/manifest.json)
endif

train-brain: install $(BRAIN_DATA)
	$(PYTHON) -m vtn_tf.cli.train --config $(BRAIN_CONFIG) --run_dir $(RUNS)/$(basename $(notdir $(BRAIN_CONFIG))) --set data.manifest=$(BRAIN_DATA) $(SET)

train-liver: install $(LIVER_MANIFEST)
	$(PYTHON) -m vtn_tf.cli.train --config $(LIVER_CONFIG) --run_dir $(RUNS)/$(basename $(notdir $(LIVER_CONFIG))) --set data.manifest=$(LIVER_MANIFEST) $(SET)

train-hippocampus: install $(PREPARED)/hippocampus/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/hippocampus-cpu.json --run_dir $(RUNS)/hippocampus-cpu $(SET)

# A tuning fold for test-time choices (passes, refinement schedules): the train-hippocampus config
# trained without the last 40 training subjects, whose 20 consecutive pairs score the choices
# (the 4 validation subjects give 12 pairs, too few to rank schedules 0.003 apart). Then:
#   vtn-evaluate --native --model runs/hippocampus-tuning --manifest prepared/hippocampus/manifest-tuning.json \
#     --split tuning --protocol consecutive --methods vtn --out tuning.csv --preset fast <--set refine.steps=... ...>
$(PREPARED)/hippocampus/manifest-tuning.json: $(PREPARED)/hippocampus/manifest.json
	$(PYTHON) -m data_prep.holdout --manifest $< --count 40 --out $@ --overwrite

tune-hippocampus: install $(PREPARED)/hippocampus/manifest-tuning.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/hippocampus-cpu.json --run_dir $(RUNS)/hippocampus-tuning \
	  --set data.manifest=$(PREPARED)/hippocampus/manifest-tuning.json $(SET)

tensorboard: install
	$(PYTHON) -m tensorboard.main --logdir $(RUNS)

clean-runs:
	rm -rf $(RUNS)

# ---- quickstart ---------------------------------------------------------------------
demo:
	$(PYTHON) -m pip install -q -e ".[plot]"
	$(PYTHON) -m vtn_tf.cli.demo --data $(VTN_DATA)

include benchmarks/Makefile.inc

# ---- evaluation and ablations (paper Tables V/IX) ----------------------------------
# One row each:  make row-hippocampus-ADD   make row-hippocampus-DD-inv   make row-brain-ADD
# A row trains the CPU config with the spec in its name (and the invertibility loss for
# "-inv"), then evaluates it on the evaluation split beside the unregistered pairs.
# BASELINES=ants,elastix adds the classical tools (pip install ".[baselines]").
BASELINES ?=
ROW_STEPS ?= 600
row_spec = $(word 1,$(subst -, ,$(1)))
row_inv = $(if $(findstring -inv,$(1)),--set model.invertibility_weight=1e-3,)

row-hippocampus-%: install $(PREPARED)/hippocampus/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/hippocampus-cpu.json --run_dir $(RUNS)/hippocampus-$* \
	  --set model.spec=$(call row_spec,$*) $(call row_inv,$*) --set train.steps_per_epoch=$$(( $(ROW_STEPS) / 4 )) $(SET)
	@mkdir -p results
	$(PYTHON) -m vtn_tf.cli.evaluate --model $(RUNS)/hippocampus-$* --manifest $(PREPARED)/hippocampus/manifest.json \
	  --protocol consecutive --methods vtn,identity$(if $(BASELINES),$(comma)$(BASELINES)) --out results/hippocampus-$*.csv --overwrite

row-brain-%: install $(PREPARED)/lpba40-64/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/brain-cpu.json --run_dir $(RUNS)/brain-$* \
	  --set model.spec=$(call row_spec,$*) $(call row_inv,$*) --set train.steps_per_epoch=$$(( $(ROW_STEPS) / 2 )) \
	  --set model.similarity_weights=last $(SET)
	@mkdir -p results
	$(PYTHON) -m vtn_tf.cli.evaluate --model $(RUNS)/brain-$* --manifest $(PREPARED)/lpba40-64/manifest.json \
	  --protocol atlas --atlas S01 --methods vtn,identity$(if $(BASELINES),$(comma)$(BASELINES)) --out results/brain-$*.csv --overwrite

comma := ,
ABLATION_SPECS ?= A D AD ADD ADDD
ablation-hippocampus: $(foreach s,$(ABLATION_SPECS),row-hippocampus-$(s) row-hippocampus-$(s)-inv)
ablation-brain: $(foreach s,$(ABLATION_SPECS),row-brain-$(s) row-brain-$(s)-inv)

# The accuracy results: train within the 2-hour CPU budget, evaluate with test-time passes
# (the count picked on the validation pairs) beside ANTs SyN and elastix on the same pairs.
ACCURACY_BASELINES ?= ants,elastix
accuracy-hippocampus: install $(PREPARED)/hippocampus/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/hippocampus-accuracy.json --run_dir $(RUNS)/hippocampus-accuracy $(SET)
	@mkdir -p results
	$(PYTHON) -m vtn_tf.cli.evaluate --model $(RUNS)/hippocampus-accuracy --manifest $(PREPARED)/hippocampus/manifest.json \
	  --protocol consecutive --passes 5 --methods vtn,identity,$(ACCURACY_BASELINES) \
	  --out results/hippocampus-accuracy.csv --overwrite
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/hippocampus-accuracy NATIVE_MANIFEST=$(PREPARED)/hippocampus/manifest.json \
	  NATIVE_NAME=hippocampus-accuracy NATIVE_PROTOCOL="--protocol consecutive" NATIVE_MISALIGN=

accuracy-brain: install $(PREPARED)/lpba40-64/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/brain-accuracy.json --run_dir $(RUNS)/brain-accuracy $(SET)
	@mkdir -p results
	$(PYTHON) -m vtn_tf.cli.evaluate --model $(RUNS)/brain-accuracy --manifest $(PREPARED)/lpba40-64/manifest.json \
	  --protocol atlas --atlas S01 --passes 2 --methods vtn,identity,$(ACCURACY_BASELINES) \
	  --out results/brain-accuracy.csv --overwrite
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/brain-accuracy NATIVE_NAME=brain-accuracy

# The anatomy-aware models (model.label_weight: a soft Dice term on the training subjects' label
# maps; labels are never needed to register): trained within the 2-hour CPU budget, then the
# native tables: network alone, the optimiser without the network, the network + refinement at
# two budgets, ANTs SyN and elastix on the same original files.
accuracy-brain-labels: install $(PREPARED)/lpba40-64/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/brain-labels.json --run_dir $(RUNS)/brain-labels \
	  --set data.manifest=$(PREPARED)/lpba40-64/manifest.json $(SET)
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/brain-labels NATIVE_NAME=brain-labels REFINE_QUARTER=15x15x15x15x3

# brain-labels with a third dense stage, its first stages from the brain-labels run (trained first).
accuracy-brain-labels-deep: install $(PREPARED)/lpba40-64/manifest.json
	test -d $(RUNS)/brain-labels/weights || $(PYTHON) -m vtn_tf.cli.train --config experiments/brain-labels.json \
	  --run_dir $(RUNS)/brain-labels --set data.manifest=$(PREPARED)/lpba40-64/manifest.json $(SET)
	$(PYTHON) -m vtn_tf.cli.train --config experiments/brain-labels-deep.json --run_dir $(RUNS)/brain-labels-deep \
	  --set data.manifest=$(PREPARED)/lpba40-64/manifest.json --set train.init_from=$(RUNS)/brain-labels $(SET)
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/brain-labels-deep NATIVE_NAME=brain-labels-deep REFINE_QUARTER=15x15x15x15x3

# A fourth dense stage from the third-stage run (trained first).
accuracy-brain-labels-deeper: install $(PREPARED)/lpba40-64/manifest.json
	test -d $(RUNS)/brain-labels-deep/weights || $(MAKE) accuracy-brain-labels-deep
	$(PYTHON) -m vtn_tf.cli.train --config experiments/brain-labels-deeper.json --run_dir $(RUNS)/brain-labels-deeper \
	  --set data.manifest=$(PREPARED)/lpba40-64/manifest.json --set train.init_from=$(RUNS)/brain-labels-deep $(SET)
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/brain-labels-deeper NATIVE_NAME=brain-labels-deeper REFINE_QUARTER=15x15x15x15x3

accuracy-hippocampus-labels: install $(PREPARED)/hippocampus/manifest.json
	$(PYTHON) -m vtn_tf.cli.train --config experiments/hippocampus-labels.json --run_dir $(RUNS)/hippocampus-labels $(SET)
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/hippocampus-labels NATIVE_MANIFEST=$(PREPARED)/hippocampus/manifest.json \
	  NATIVE_NAME=hippocampus-labels NATIVE_PROTOCOL="--protocol consecutive" NATIVE_MISALIGN= REFINE_QUARTER=10x3 \
	  NATIVE_REFINE_FULL=40x12

# The native-resolution tables (the user's path): the original files registered through the
# vtn-register code, scored on the fixed image's grid, aligned and moved by known rigid transforms
# in their headers; ANTs SyN and elastix on the same files. The rows name vtn-register's presets:
# fast (the network alone), fast with a refinement on the default levels (REFINE_STEPS each), accurate
# (the schedule validated for the model: its config's register section), optimiser (accurate
# without the network) and, with REFINE_QUARTER, accurate with fewer steps per level.
# `make evaluate-brain` and `make evaluate-hippocampus` do this for the `make train-brain` and
# `make train-hippocampus` models.
NATIVE_MODEL ?= $(RUNS)/brain-cpu
NATIVE_MANIFEST ?= $(PREPARED)/lpba40-64/manifest.json
NATIVE_NAME ?= brain-cpu
NATIVE_PROTOCOL ?= --protocol atlas --atlas S01
NATIVE_BASELINES ?= ants,elastix
NATIVE_MISALIGN ?= rigid
REFINE_STEPS ?= 60
# Empty: no accurate and optimiser rows.
NATIVE_ACCURATE ?= yes
# Steps per level of the accurate schedule at a quarter of its budget (empty: no such row): does the
# network's field let a quarter of the optimiser's budget reach what the optimiser alone reaches?
REFINE_QUARTER ?=
# The refinement schedule of the accurate and optimiser rows when the model's own accurate preset
# has none (a model whose network alone validated best): e.g. 40x12 (empty: the preset's).
NATIVE_REFINE_FULL ?=
native_full = $(if $(NATIVE_REFINE_FULL),--set refine.steps=$(NATIVE_REFINE_FULL))
native_eval = $(PYTHON) -m vtn_tf.cli.evaluate --native --model $(NATIVE_MODEL) --manifest $(NATIVE_MANIFEST) \
	  $(NATIVE_PROTOCOL) --overwrite
native-tables:
	@mkdir -p results
	$(native_eval) --preset fast --methods vtn,identity$(if $(NATIVE_BASELINES),$(comma)$(NATIVE_BASELINES)) --out results/$(NATIVE_NAME)-native.csv
	$(native_eval) --preset fast --set refine.steps=$(REFINE_STEPS) --methods vtn --out results/$(NATIVE_NAME)-native-refine.csv
	$(if $(NATIVE_ACCURATE),$(native_eval) --preset accurate $(native_full) --methods vtn --out results/$(NATIVE_NAME)-native-refine-full.csv)
	$(if $(NATIVE_ACCURATE),$(native_eval) --preset optimiser $(native_full) --methods vtn --out results/$(NATIVE_NAME)-native-optimiser.csv)
	$(if $(REFINE_QUARTER),$(native_eval) --preset accurate --set refine.steps=$(REFINE_QUARTER) --methods vtn --out results/$(NATIVE_NAME)-native-refine-quarter.csv)
	$(if $(NATIVE_MISALIGN),$(native_eval) --preset fast --misalign $(NATIVE_MISALIGN) --methods vtn$(comma)identity$(if $(NATIVE_BASELINES),$(comma)$(NATIVE_BASELINES)) --out results/$(NATIVE_NAME)-native-misaligned.csv)
	$(if $(NATIVE_MISALIGN),$(native_eval) --preset fast --set refine.steps=$(REFINE_STEPS) --misalign $(NATIVE_MISALIGN) --methods vtn --out results/$(NATIVE_NAME)-native-misaligned-refine.csv)
	$(if $(NATIVE_MISALIGN),$(if $(NATIVE_ACCURATE),$(native_eval) --preset accurate --misalign $(NATIVE_MISALIGN) --methods vtn --out results/$(NATIVE_NAME)-native-misaligned-refine-full.csv))
	$(if $(NATIVE_MISALIGN),$(if $(NATIVE_ACCURATE),$(native_eval) --preset optimiser --misalign $(NATIVE_MISALIGN) --methods vtn --out results/$(NATIVE_NAME)-native-misaligned-optimiser.csv))

evaluate-hippocampus: install $(PREPARED)/hippocampus/manifest.json
	$(MAKE) native-tables NATIVE_MODEL=$(RUNS)/hippocampus-cpu NATIVE_MANIFEST=$(PREPARED)/hippocampus/manifest.json \
	  NATIVE_NAME=hippocampus-cpu NATIVE_PROTOCOL="--protocol consecutive" NATIVE_MISALIGN=

evaluate-brain: install $(PREPARED)/lpba40-64/manifest.json
	@mkdir -p results
	$(PYTHON) -m vtn_tf.cli.evaluate --model $(RUNS)/brain-cpu --manifest $(PREPARED)/lpba40-64/manifest.json \
	  --protocol atlas --atlas S01 --methods vtn,identity --out results/brain-cpu.csv --overwrite
	$(MAKE) native-tables
