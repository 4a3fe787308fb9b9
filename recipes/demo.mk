# The llamactl flow on the embedded example data. Run through `make demo` (which sets up .venv first), or
#   make -f recipes/demo.mk PY=.venv/bin/python all
# Every step is a file target: re-running redoes only what changed.
PY ?= python3
LLAMACTL := $(PY) -m llamactl.cli
OUT := runs/demo

.PHONY: all convert-demo generate-demo

all: convert-demo generate-demo

# A real pretrained llama2.c model (TinyStories, 260K parameters) into a self-describing llamactl checkpoint,
# and from there into a Hugging Face directory that transformers loads.
$(OUT)/stories260K.safetensors: examples/stories260K.bin
	@mkdir -p $(OUT)
	$(LLAMACTL) convert $< -o $@
	$(LLAMACTL) convert --info $@

$(OUT)/stories260K-hf/config.json: $(OUT)/stories260K.safetensors
	$(LLAMACTL) convert $< --to hf -o $(dir $@)

convert-demo: $(OUT)/stories260K-hf/config.json

# Greedy and sampled completions of token prompts (this model ships without its 512-piece tokenizer).
$(OUT)/stories-completions.jsonl: $(OUT)/stories260K.safetensors examples/stories-prompts.jsonl
	$(LLAMACTL) generate -m $< -i examples/stories-prompts.jsonl -o $@ --max-new-tokens 40 --temperature 0 --dtype fp32
	@head -c 600 $@; echo

generate-demo: $(OUT)/stories-completions.jsonl
