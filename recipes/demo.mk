# The llamactl flow on the embedded example data. Run through `make demo` (which sets up .venv first), or
#   make -f recipes/demo.mk PY=.venv/bin/python all
# Every step is a file target: re-running redoes only what changed.
PY ?= python3
LLAMACTL := $(PY) -m llamactl.cli
# No process started here (nor torchrun's ranks) puts the working directory on sys.path, where the repository's
# kernels/ folder would pass for the top-level package `kernels` (Python >= 3.11; the Makefile says why).
export PYTHONSAFEPATH := 1
OUT := runs/demo
START := $(shell date +%s)

.PHONY: all convert-demo generate-demo pretrain-demo chat-demo rlhf-demo quant-demo lora-demo

all: convert-demo generate-demo pretrain-demo chat-demo rlhf-demo quant-demo lora-demo
	@echo
	@echo "llamactl demo: done in $$(( $$(date +%s) - $(START) )) s; what it made is in $(OUT)/ (run again: only what changed):"
	@echo "  stories260K.safetensors      llama2.c's TinyStories 260K model as a llamactl checkpoint (convert)"
	@echo "  stories260K-hf/              the same model as a Hugging Face directory (convert --to hf)"
	@echo "  stories-completions.jsonl    its greedy completions, as token ids (generate)"
	@echo "  shakespeare/tokenizer.model  a 2048-piece BPE tokenizer trained on tiny Shakespeare (tokenize train)"
	@echo "  shakespeare/shards/          the play as token shards, 5% held out (tokenize encode --out)"
	@echo "  shakespeare/run/             a 300-step pretraining run: metrics.jsonl, checkpoints, model.safetensors"
	@echo "  shakespeare/samples.jsonl    text sampled from that model (generate), printed above"
	@echo "  shakespeare/sft/             that model fine-tuned on Anthropic HH dialogs, answers only (sft)"
	@echo "  shakespeare/chat.jsonl       seed prompts answered by the fine-tuned model (chat, batch mode), printed above"
	@echo "  shakespeare/gatt.jsonl       Ghost Attention training dialogs it sampled (gatt-augment -m)"
	@echo "  shakespeare/gatt-sft/        the chat model fine-tuned on them (sft, loss on each dialog's last turn)"
	@echo "  shakespeare/rm/              a safety reward model on Anthropic's harmless pairs, held-out accuracy (train-rm)"
	@echo "  shakespeare/scored.jsonl     four human-chosen answers as that reward model scores them (score)"
	@echo "  shakespeare/best.jsonl       the best of 4 sampled answers per prompt by that reward (rejection-sample)"
	@echo "  shakespeare/ppo/             the chat model after 2 PPO iterations against it (ppo), metrics.jsonl"
	@echo "  shakespeare/compare.json     ppo against sft as the reward model judges (compare), printed above"
	@echo "  shakespeare/quant/           the base model in int8 and int4 (quantize; GPTQ on the training text) and"
	@echo "                               what each costs on held-out text: perplexity, KL to the source (eval)"
	@echo "  shakespeare/lora/             sft again as LoRA adapters of rank 16 on the frozen base (adapter.safetensors)"
	@echo "  shakespeare/qlora/            the same on the int8 base, which stays quantized (QLoRA)"
	@echo "  shakespeare/lora-chat.jsonl   the seed prompts answered by the base with the adapter (chat --adapter)"
	@echo "  shakespeare/lora-merged.safetensors, lora-peft/  the adapter merged into the base; as a PEFT adapter"

# A real pretrained llama2.c model (TinyStories, 260K parameters) into a self-describing llamactl checkpoint,
# and from there into a Hugging Face directory that transformers loads.
$(OUT)/stories260K.safetensors: examples/stories260K.bin
	@mkdir -p $(OUT)
	$(LLAMACTL) convert $< -o $@
	$(LLAMACTL) convert --info $@

$(OUT)/stories260K-hf/config.json: $(OUT)/stories260K.safetensors
	$(LLAMACTL) convert $< --to hf -o $(dir $@)

convert-demo: $(OUT)/stories260K-hf/config.json

# Greedy completions of token prompts (this model ships without its 512-piece tokenizer, so they stay ids).
$(OUT)/stories-completions.jsonl: $(OUT)/stories260K.safetensors examples/stories-prompts.jsonl
	$(LLAMACTL) generate -m $< -i examples/stories-prompts.jsonl -o $@ --max-new-tokens 40 --temperature 0 --dtype fp32
	@$(PY) -c "import sys; n = sum(1 for _ in open(sys.argv[1])); print(f'{sys.argv[1]}: {n} completions (ids)')" $@

generate-demo: $(OUT)/stories-completions.jsonl

# Raw text -> tokenizer -> token shards (5% held out) -> a small base model trained for a few minutes on the CPU
# -> samples from it. `pretrain --resume` continues an interrupted run (Ctrl-C saves) instead of starting over.
SHK := $(OUT)/shakespeare
$(SHK)/tokenizer.model: examples/tinyshakespeare.txt
	@mkdir -p $(SHK)
	$(LLAMACTL) tokenize train $< -o $@ --vocab-size 2048

# The play's last 2,000 lines are never trained on: the held-out text that eval measures models on.
$(SHK)/train.txt: examples/tinyshakespeare.txt
	@mkdir -p $(SHK)
	head -n 38000 $< > $@

$(SHK)/heldout.txt: examples/tinyshakespeare.txt
	@mkdir -p $(SHK)
	tail -n +38001 $< > $@

$(SHK)/shards/index.json: $(SHK)/train.txt $(SHK)/tokenizer.model
	$(LLAMACTL) tokenize encode $< -t $(SHK)/tokenizer.model --out $(SHK)/shards --val-fraction 0.05 --workers 2

$(SHK)/run/model.safetensors: $(SHK)/shards/index.json
	$(LLAMACTL) pretrain $(SHK)/shards -o $(SHK)/run --resume --preset llama2-15m \
		--set dim=256 --set n_layers=6 --set n_heads=8 --set n_kv_heads=4 --set multiple_of=128 --set tie_embeddings=false \
		--seq-len 256 --batch-size 16 --steps 300 --lr 2e-3 --warmup 30 --eval-every 50 --save-every 100

$(SHK)/samples.jsonl: $(SHK)/run/model.safetensors examples/shakespeare-prompts.jsonl
	$(LLAMACTL) generate -m $< -i examples/shakespeare-prompts.jsonl -o $@ --max-new-tokens 60 --temperature 0.8 --seed 1
	@$(PY) -c "import json,sys; [print(r['prompt'] + r['completion'], end='\n---\n') for r in map(json.loads, open(sys.argv[1]))]" $@

pretrain-demo: $(SHK)/samples.jsonl

# The base model -> supervised fine-tuning on real dialogs (the chosen answers of Anthropic's HH preference data,
# loss on the answers only) -> a few of the seed prompts answered through a pipe -> Ghost Attention training
# dialogs: an instruction on every user turn, each turn answered by the fine-tuned model, then written with the
# instruction once and only the last turn trained on. (A 2048-piece Shakespeare tokenizer and a few minutes of CPU
# make a model that babbles: the demo shows the flow, not a good assistant.)
$(SHK)/sft/model.safetensors: $(SHK)/run/model.safetensors examples/hh-harmless-chosen.jsonl
	$(LLAMACTL) sft -m $< --data examples/hh-harmless-chosen.jsonl --field chosen -o $(SHK)/sft --resume \
		--seq-len 256 --batch-size 8 --global-batch-size 16 --epochs 1 --lr 5e-4 --val-fraction 0.05

$(SHK)/chat.jsonl: $(SHK)/sft/model.safetensors examples/seed-prompts.jsonl
	sed -n '3p;5,7p' examples/seed-prompts.jsonl | $(LLAMACTL) chat -m $< --max-new-tokens 48 --seed 1 -o $@
	@$(PY) -c "import json,sys; [print(r['messages'][-2]['content'], '->', r['messages'][-1]['content'], end='\n---\n') for r in map(json.loads, open(sys.argv[1]))]" $@

$(SHK)/gatt.jsonl: $(SHK)/sft/model.safetensors examples/gatt-dialogs.jsonl
	$(LLAMACTL) gatt-augment -i examples/gatt-dialogs.jsonl -m $< --max-new-tokens 32 --seed 1 -o $@

# ... and the GAtt dialogs train the chat model further (only their last turns count toward the loss).
$(SHK)/gatt-sft/model.safetensors: $(SHK)/sft/model.safetensors $(SHK)/gatt.jsonl
	$(LLAMACTL) sft -m $< --data $(SHK)/gatt.jsonl -o $(SHK)/gatt-sft --resume --seq-len 256 --batch-size 8 \
		--global-batch-size 8 --epochs 2 --lr 2e-4

chat-demo: $(SHK)/chat.jsonl $(SHK)/gatt-sft/model.safetensors

# RLHF as Llama 2 does it, in miniature: a safety reward model from human preference pairs (the margin ranking
# loss; these pairs carry no rating, so no margin) -> the best of 4 sampled answers per prompt (rejection sampling,
# the prompt's KV cache forked to its samples) -> two PPO iterations against the hybrid reward -> the win rate of the
# PPO model over the sft model as the reward model judges it. recipes/llama2-chat.mk is the paper's whole flow.
$(SHK)/rm/model.safetensors: $(SHK)/sft/model.safetensors examples/hh-harmless-pairs.jsonl
	$(LLAMACTL) train-rm -m $< --data examples/hh-harmless-pairs.jsonl -o $(SHK)/rm --resume --kind safety \
		--seq-len 256 --batch-size 8 --global-batch-size 32 --steps 12 --lr 3e-4 --warmup 2 --val-fraction 0.05

$(SHK)/best.jsonl: $(SHK)/sft/model.safetensors $(SHK)/rm/model.safetensors examples/hh-prompts.jsonl
	head -12 examples/hh-prompts.jsonl | $(LLAMACTL) rejection-sample -m $< --rm $(SHK)/rm/model.safetensors \
		-k 4 --max-new-tokens 32 --seed 1 -o $@
	@$(PY) -c "import json,sys; [print(r['messages'][-2]['content'], '->', r['messages'][-1]['content'], '| scores', [round(s, 2) for s in r['scores']]) for r in list(map(json.loads, open(sys.argv[1])))[:4]]" $@

$(SHK)/ppo/model.safetensors: $(SHK)/sft/model.safetensors $(SHK)/rm/model.safetensors examples/hh-prompts.jsonl
	$(LLAMACTL) ppo -m $< --rm $(SHK)/rm/model.safetensors --safety-rm $(SHK)/rm/model.safetensors \
		--prompts examples/hh-prompts.jsonl -o $(SHK)/ppo --resume --iterations 2 --prompts-per-iteration 16 \
		--minibatch-size 8 --batch-size 8 --max-new-tokens 32 --lr 2e-5

$(SHK)/compare.json: $(SHK)/ppo/model.safetensors $(SHK)/sft/model.safetensors $(SHK)/rm/model.safetensors
	tail -24 examples/hh-prompts.jsonl | $(LLAMACTL) compare -a $< -b $(SHK)/sft/model.safetensors \
		--rm $(SHK)/rm/model.safetensors --max-new-tokens 32 --seed 1 -o $@
	@cat $@; echo

# The reward model's verdict on a few human-chosen answers (score adds score and score_prob to each record).
$(SHK)/scored.jsonl: $(SHK)/rm/model.safetensors examples/hh-harmless-pairs.jsonl
	head -4 examples/hh-harmless-pairs.jsonl | $(LLAMACTL) score -m $< --field chosen -o $@
	@$(PY) -c "import json,sys; [print(round(r['score_prob'], 3), '<-', r['chosen'].strip()[:80].replace(chr(10), ' ')) for r in map(json.loads, open(sys.argv[1]))]" $@

rlhf-demo: $(SHK)/best.jsonl $(SHK)/compare.json $(SHK)/scored.jsonl

# Quantization and what it costs: the base model's linear layers in int8 and int4 (round to nearest; groups of 128
# and of 32 inputs; and GPTQ, correcting each layer's rounding on 128 windows of the training text), each evaluated
# on the held-out text beside the source: perplexity, and the KL divergence of its next-token distributions from
# the source's (eval --reference; in fp32, so that the figures are the weights' rounding alone: by default a quantized
# model computes in bf16 on a CPU that has it). Every command loads the quantized files as they are (generate, chat...).
QNT := $(SHK)/quant
$(QNT)/int8.safetensors: $(SHK)/run/model.safetensors
	@mkdir -p $(QNT)
	$(LLAMACTL) quantize -m $< -o $@ --scheme int8 > /dev/null

$(QNT)/int4-g128.safetensors: $(SHK)/run/model.safetensors
	@mkdir -p $(QNT)
	$(LLAMACTL) quantize -m $< -o $@ --scheme int4 --group-size 128 > /dev/null

$(QNT)/int4-g32.safetensors: $(SHK)/run/model.safetensors
	@mkdir -p $(QNT)
	$(LLAMACTL) quantize -m $< -o $@ --scheme int4 --group-size 32 > /dev/null

$(QNT)/int4-g128-gptq.safetensors: $(SHK)/run/model.safetensors $(SHK)/train.txt
	@mkdir -p $(QNT)
	$(LLAMACTL) quantize -m $< -o $@ --scheme int4 --group-size 128 --calibration $(SHK)/train.txt \
		--calibration-samples 128 > /dev/null

QUANTIZED := $(addprefix $(QNT)/,int8.safetensors int4-g128.safetensors int4-g32.safetensors int4-g128-gptq.safetensors)
$(QNT)/eval.jsonl: $(SHK)/run/model.safetensors $(SHK)/heldout.txt $(QUANTIZED)
	$(LLAMACTL) eval -m $< --data $(SHK)/heldout.txt > $@.tmp
	for m in $(QUANTIZED); do $(LLAMACTL) eval -m $$m --reference $< --data $(SHK)/heldout.txt --dtype fp32 >> $@.tmp; done
	mv $@.tmp $@
	@$(PY) -c "import json,os,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; src=rows[0]['perplexity']; [print(f\"{os.path.basename(r['model']):<28} {os.path.getsize(r['model'])/1e6:5.1f} MB  perplexity {r['perplexity']:7.3f} ({100*(r['perplexity']/src-1):+.2f}%)  KL {r.get('kl_mean', 0):.5f}  same top {r.get('same_top', 1):.3f}\") for r in rows]" $@

quant-demo: $(QNT)/eval.jsonl

# LoRA: the sft stage again, as adapters of rank 16 on every block linear of the frozen base (sft --lora-rank; a
# higher learning rate, as LoRA takes), its held-out loss next to full fine-tuning's; then QLoRA, the same on the
# int8 model, which stays quantized. An adapter file names its base by sha256: chat takes it beside the base,
# convert merges it or writes it for Hugging Face PEFT.
LORA_FLAGS := --data examples/hh-harmless-chosen.jsonl --field chosen --resume --seq-len 256 --batch-size 8 \
	--global-batch-size 16 --epochs 1 --lr 2e-3 --val-fraction 0.05 --lora-rank 16

$(SHK)/lora/adapter.safetensors: $(SHK)/run/model.safetensors examples/hh-harmless-chosen.jsonl
	$(LLAMACTL) sft -m $< -o $(SHK)/lora $(LORA_FLAGS)

$(SHK)/qlora/adapter.safetensors: $(QNT)/int8.safetensors examples/hh-harmless-chosen.jsonl
	$(LLAMACTL) sft -m $< -o $(SHK)/qlora $(LORA_FLAGS)

$(SHK)/lora-chat.jsonl: $(SHK)/lora/adapter.safetensors $(SHK)/run/model.safetensors examples/seed-prompts.jsonl
	sed -n '3p;5,7p' examples/seed-prompts.jsonl | $(LLAMACTL) chat -m $(SHK)/run/model.safetensors --adapter $< \
		--max-new-tokens 48 --seed 1 -o $@
	@$(PY) -c "import json,sys; [print(r['messages'][-2]['content'], '->', r['messages'][-1]['content'], end='\n---\n') for r in map(json.loads, open(sys.argv[1]))]" $@

$(SHK)/lora-merged.safetensors: $(SHK)/lora/adapter.safetensors $(SHK)/run/model.safetensors
	$(LLAMACTL) convert $(SHK)/run/model.safetensors --merge-adapter $< -o $@

$(SHK)/lora-peft/adapter_config.json: $(SHK)/lora/adapter.safetensors
	$(LLAMACTL) convert $< --to peft -o $(dir $@)
	$(LLAMACTL) convert --info $<

lora-demo: $(SHK)/lora-chat.jsonl $(SHK)/qlora/adapter.safetensors $(SHK)/lora-merged.safetensors \
		$(SHK)/lora-peft/adapter_config.json
	@$(PY) -c "import json,sys; last=lambda p: [json.loads(l) for l in open(p)][-1]; [print(f'{n:<22} held-out loss {last(p)[\"val_loss\"]:.5f}') for n, p in zip(['sft (all weights)', 'sft --lora-rank 16', 'sft --lora-rank 16 int8'], sys.argv[1:])]" \
		$(SHK)/sft/metrics.jsonl $(SHK)/lora/metrics.jsonl $(SHK)/qlora/metrics.jsonl
