# Training side: offline corpus, tokenizer, the embedded tiny model, fine-tuning and the quality report.
TINY := models/tiny-opt-kjv
TINY_BUILD := build/tiny-opt-kjv
CORPUS := build/corpus
# Steps measured to fit ~35 min on a 2-core CPU (1-2 s per step of 16 x 128 tokens); see the model card.
PRETRAIN_STEPS ?= 1000
SKIPTUNE_STEPS ?= 1000
TUNE_SPEEDUPS ?= 2,3,5
DATA ?= $(CORPUS)/kjv-train.txt
FT_OUT ?= runs/finetune-$(notdir $(MODEL))
FT_STEPS ?= 500
EVAL_MODEL ?= $(TINY)/skip-tuned
EVAL_BASE ?= $(TINY)/pretrained
EVAL_OUT ?= build/quality
HF_FILES := config.json generation_config.json model.safetensors tokenizer.json training.json

.PHONY: corpus tiny-model finetune eval

# Write the public-domain KJV corpus (train / 5% held-out chapters) and the committed held-out sample.
corpus:
	$(SD) corpus --out $(CORPUS) --sample $(TINY)/heldout.txt

# Reproduce models/tiny-opt-kjv end to end: corpus -> tokenizer -> pretrain -> skip-tune -> report + card.
tiny-model: corpus
	$(SD) train-tokenizer --data $(CORPUS)/kjv-train.txt --vocab-size 8192 --out $(TINY_BUILD)/tokenizer.json
	$(SD) finetune --config configs/tiny-opt-kjv.json --tokenizer $(TINY_BUILD)/tokenizer.json \
	    --data $(CORPUS)/kjv-train.txt --heldout $(CORPUS)/kjv-heldout.txt --out $(TINY_BUILD)/pretrained \
	    --speedups 1 --steps $(PRETRAIN_STEPS) --lr 2e-3 --warmup-steps 100 --resume
	$(SD) finetune --model $(TINY_BUILD)/pretrained --data $(CORPUS)/kjv-train.txt \
	    --heldout $(CORPUS)/kjv-heldout.txt --out $(TINY_BUILD)/skip-tuned \
	    --speedups $(TUNE_SPEEDUPS) --steps $(SKIPTUNE_STEPS) --lr 5e-4 --warmup-steps 50 --resume
	for m in pretrained skip-tuned; do mkdir -p $(TINY)/$$m && \
	    cp $(addprefix $(TINY_BUILD)/$$m/,$(HF_FILES)) $(TINY)/$$m/; done
	$(SD) eval --model $(TINY)/skip-tuned --base $(TINY)/pretrained --data $(TINY)/heldout.txt \
	    --max-layers 12 --min-layers 6 --max-layers 8 --min-layers 4 --json $(TINY)/quality.json --out-dir $(TINY)
	$(PY) -m skipdecode.training.model_card $(TINY)

# Skip-tune any OPT checkpoint: make finetune MODEL=opt-125m DATA="a.txt b.jsonl" [FT_STEPS=500 FT_OUT=dir].
finetune:
	$(SD) finetune --model $(MODEL) --data $(DATA) --out $(FT_OUT) --speedups $(TUNE_SPEEDUPS) --steps $(FT_STEPS) --resume

# Quality report (perplexity, agreement, ROUGE-L vs speedup; tuned vs untuned) into $(EVAL_OUT); ENGINE=dir
# takes the tuned model's continuations from its exported onnxruntime engine instead of the torch reference.
eval:
	$(SD) eval --model $(EVAL_MODEL) --base $(EVAL_BASE) $(if $(ENGINE),--engine $(ENGINE)) \
	    --json $(EVAL_OUT)/quality.json --out-dir $(EVAL_OUT)
