# Llama 2-Chat's whole recipe (Touvron et al., 2023, sections 3.1-3.3) as one Makefile, pointed at your own data:
#
#   make -f recipes/llama2-chat.mk BASE=base.safetensors SFT_DATA=dialogs.jsonl HELP_PAIRS=help.jsonl \
#        SAFETY_PAIRS=safety.jsonl PROMPTS=prompts.jsonl OUT=runs/chat [NPROC=8] [PRESET_LR=...]
#   make -n -f recipes/llama2-chat.mk          prints the chain without running it
#
# sft -> a helpfulness and a safety reward model -> RLHF-V1..V4 by rejection sampling (each round samples from the
# latest model, keeps the best answer per prompt pooled with the earlier rounds' best, and fine-tunes the latest model
# on the pool) -> PPO on top of V4 (V5) -> Ghost Attention (multi-turn dialogs answered by V5 under an instruction,
# then fine-tuned on their last turns). Every stage is a file target: an interrupted chain continues where it
# stopped (each training stage is also --resume'd). The hyperparameters are the paper's (the commands' defaults);
# override any stage's extra flags with SFT_FLAGS, RM_FLAGS, RS_FLAGS, RS_SFT_FLAGS, PPO_FLAGS, GATT_FLAGS.
# NPROC > 1 runs the training stages data-parallel under torchrun (FSDP2 with DIST=fsdp).

PY ?= python3
NPROC ?= 1
DIST ?= ddp
LLAMACTL := $(PY) -m llamactl.cli
# No process started here (nor torchrun's ranks) puts the working directory on sys.path, where the repository's
# kernels/ folder would pass for the top-level package `kernels` (Python >= 3.11; the Makefile says why).
export PYTHONSAFEPATH := 1
TRAIN := $(if $(filter 1,$(NPROC)),$(LLAMACTL),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m llamactl.cli)

BASE ?= base.safetensors
SFT_DATA ?= sft.jsonl
HELP_PAIRS ?= helpfulness-pairs.jsonl
SAFETY_PAIRS ?= safety-pairs.jsonl
PROMPTS ?= prompts.jsonl
GATT_DIALOGS ?= $(SFT_DATA)
OUT ?= runs/llama2-chat

# Llama 2, section 3.2.3: the best of K samples, K and the temperature raised over the iterations (the best
# temperature drifts up as the model improves); one entry per round.
RS_K ?= 4 8 16 16
RS_TEMPERATURE ?= 0.9 1.0 1.1 1.2
SFT_FLAGS ?=
RM_FLAGS ?= --val-fraction 0.05
RS_FLAGS ?=
RS_SFT_FLAGS ?= --epochs 2
PPO_FLAGS ?= --iterations 200
GATT_FLAGS ?=

.PHONY: all sft reward-models rejection-sampling ppo gatt serve sft-lora plan
all: $(OUT)/v6-gatt/model.safetensors $(OUT)/v6-gatt/model-int8.safetensors

sft: $(OUT)/sft/model.safetensors
reward-models: $(OUT)/rm-helpfulness/model.safetensors $(OUT)/rm-safety/model.safetensors
rejection-sampling: $(OUT)/v4/model.safetensors
ppo: $(OUT)/v5-ppo/model.safetensors
gatt: $(OUT)/v6-gatt/model.safetensors

# 3.1: supervised fine-tuning (2 epochs, lr 2e-5, 64 sequences a step, answers only)
# Your inputs are prerequisites where they exist (a missing one is then reported by the command, in one line), so that
# `make -n` prints the chain before any data is in place.
in = $(wildcard $(1))

$(OUT)/sft/model.safetensors: $(call in,$(BASE) $(SFT_DATA))
	$(TRAIN) sft -m $(BASE) --data $(SFT_DATA) -o $(OUT)/sft --resume --distributed $(DIST) $(SFT_FLAGS)

# One GPU instead: `make sft-lora` runs the SFT stage as LoRA adapters (QLoRA when BASE is a quantized checkpoint) and
# merges them into the base; the chain continues from it once it is copied to $(OUT)/sft/model.safetensors.
# LORA_FLAGS: --lora-alpha, --lora-targets ...
LORA_RANK ?= 16
LORA_FLAGS ?=
sft-lora: $(OUT)/sft-lora/merged.safetensors

$(OUT)/sft-lora/adapter.safetensors: $(call in,$(BASE) $(SFT_DATA))
	$(TRAIN) sft -m $(BASE) --data $(SFT_DATA) -o $(OUT)/sft-lora --resume --distributed $(DIST) \
		--lora-rank $(LORA_RANK) $(LORA_FLAGS) $(SFT_FLAGS)

$(OUT)/sft-lora/merged.safetensors: $(OUT)/sft-lora/adapter.safetensors
	$(LLAMACTL) convert $(BASE) --merge-adapter $< -o $@

# The memory the SFT stage takes on each of NPROC devices, before anything runs (DEVICE_MEMORY: e.g. 80GB)
DEVICE_MEMORY ?= 80GB
plan:
	$(LLAMACTL) sft -m $(BASE) --data $(SFT_DATA) -o $(OUT)/sft --distributed $(DIST) --device cuda \
		--world-size $(NPROC) --device-memory $(DEVICE_MEMORY) $(SFT_FLAGS) --dry-run

# 3.2.2: two reward models from the chat model (1 epoch, lr 1e-5, 512 pairs a step, margin from the ratings)
$(OUT)/rm-helpfulness/model.safetensors: $(OUT)/sft/model.safetensors $(call in,$(HELP_PAIRS))
	$(TRAIN) train-rm -m $< --data $(HELP_PAIRS) --kind helpfulness -o $(OUT)/rm-helpfulness --resume \
		--distributed $(DIST) $(RM_FLAGS)

$(OUT)/rm-safety/model.safetensors: $(OUT)/sft/model.safetensors $(call in,$(SAFETY_PAIRS))
	$(TRAIN) train-rm -m $< --data $(SAFETY_PAIRS) --kind safety -o $(OUT)/rm-safety --resume \
		--distributed $(DIST) $(RM_FLAGS)

RMS := --rm $(OUT)/rm-helpfulness/model.safetensors --safety-rm $(OUT)/rm-safety/model.safetensors

# 3.2.3: RLHF-V1..V4 by rejection sampling. Round n samples from V(n-1) (V0 = the sft model), pools its best
# answers with those of the rounds before (the paper's fix for the regressions it saw between rounds), and
# fine-tunes V(n-1) on the pool.
define rs_round
$(OUT)/best-v$(1).jsonl: $(2) $(OUT)/rm-helpfulness/model.safetensors $(OUT)/rm-safety/model.safetensors \
		$(call in,$(PROMPTS)) $(3)
	$(LLAMACTL) rejection-sample -m $(2) $(RMS) -i $(PROMPTS) -o $$@ -k $(word $(1),$(RS_K)) \
		--temperature $(word $(1),$(RS_TEMPERATURE)) --seed $(1) $(if $(3),--pool $(3)) $(RS_FLAGS)

$(OUT)/v$(1)/model.safetensors: $(2) $(OUT)/best-v$(1).jsonl
	$(TRAIN) sft -m $(2) --data $(OUT)/best-v$(1).jsonl -o $(OUT)/v$(1) --resume --distributed $(DIST) $(RS_SFT_FLAGS)
endef
$(eval $(call rs_round,1,$(OUT)/sft/model.safetensors,))
$(eval $(call rs_round,2,$(OUT)/v1/model.safetensors,$(OUT)/best-v1.jsonl))
$(eval $(call rs_round,3,$(OUT)/v2/model.safetensors,$(OUT)/best-v2.jsonl))
$(eval $(call rs_round,4,$(OUT)/v3/model.safetensors,$(OUT)/best-v3.jsonl))

# 3.2.3: PPO on top of the last rejection-sampling model (lr 1e-6, 512 prompts an iteration, minibatches of 64,
# KL beta 0.01, the hybrid safety/helpfulness reward)
$(OUT)/v5-ppo/model.safetensors: $(OUT)/v4/model.safetensors $(OUT)/rm-helpfulness/model.safetensors \
		$(OUT)/rm-safety/model.safetensors $(call in,$(PROMPTS))
	$(TRAIN) ppo -m $< $(RMS) --prompts $(PROMPTS) -o $(OUT)/v5-ppo --resume $(PPO_FLAGS)

# 3.3: Ghost Attention: dialogs answered by the latest model with an instruction on every user turn, written with
# the instruction once and only the last turn trained on, then fine-tuned on
$(OUT)/gatt.jsonl: $(OUT)/v5-ppo/model.safetensors $(call in,$(GATT_DIALOGS))
	$(LLAMACTL) gatt-augment -i $(GATT_DIALOGS) -m $< -o $@ $(GATT_FLAGS)

$(OUT)/v6-gatt/model.safetensors: $(OUT)/v5-ppo/model.safetensors $(OUT)/gatt.jsonl
	$(TRAIN) sft -m $< --data $(OUT)/gatt.jsonl -o $(OUT)/v6-gatt --resume --distributed $(DIST) $(SFT_FLAGS)

# Serving: the release advises 8-bit weights for 70B on two GPUs. int8 per output channel costs the least
# (llamactl eval --reference the bf16 model says how much); every command loads the file as it is.
$(OUT)/v6-gatt/model-int8.safetensors: $(OUT)/v6-gatt/model.safetensors
	$(LLAMACTL) quantize -m $< -o $@ --scheme int8

serve: $(OUT)/v6-gatt/model-int8.safetensors
