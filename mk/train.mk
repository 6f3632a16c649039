# Training side: offline corpus, tokenizer, the embedded models, fine-tuning and the quality report.
TINY := models/tiny-opt-kjv
CORPUS := build/corpus
TUNE_SPEEDUPS ?= 2,3,5
DATA ?= $(CORPUS)/kjv-train.txt
FT_OUT ?= runs/finetune-$(notdir $(MODEL))
FT_STEPS ?= 500
EVAL_MODEL ?= $(TINY)/skip-tuned
EVAL_BASE ?= $(TINY)/pretrained
EVAL_OUT ?= build/quality
HF_FILES := config.json generation_config.json model.safetensors tokenizer.json training.json
BASE_RECORD := config.json training.json  # the untuned base's record, where its weights are not committed

# The embedded models share one recipe (`tiny-model small-model` below); each sets its name, tokenizer, steps and
# learning rates as target-specific variables. Checkpoints live in build/<name>/, the committed files in models/<name>/.
# Both phases run with --resume, so re-running a target after a kill continues from the last checkpoint.
#
# tiny-opt-kjv (hidden 192, 12 layers, 7.0 M params): its own BPE tokenizer (vocab 8192); steps measured to fit
# ~35 min on a 2-core CPU (~0.9 s per step of 16 x 128 tokens); see its model card.
tiny-model: NAME := tiny-opt-kjv
tiny-model: TOKENIZER := build/tiny-opt-kjv/tokenizer.json
tiny-model: TRAIN_TOKENIZER := yes
tiny-model: PRETRAIN_STEPS ?= 1000
tiny-model: PRETRAIN_LR := 2e-3
tiny-model: SKIPTUNE_STEPS ?= 1000
tiny-model: SKIPTUNE_LR := 5e-4
tiny-model: CHECKPOINT_EVERY := 200
tiny-model: BASE_WEIGHTS := yes
#
# small-opt-kjv (hidden 384, 12 layers, 24.5 M params, ~49 MiB in fp16): big enough that batch-1 decoding reads
# its weights from DRAM (~98 MiB in fp32 against an 8 MiB last-level cache), with the tiny model's tokenizer so the
# LM head stays ~13% of the weights. Measured 3.1 s per step of 16 x 128 tokens on 2 idle cores (3.5x the tiny
# model's FLOPs), so 1000 pretraining + 3000 skip-tuning steps take ~3.5 h, plus ~10 min for the held-out losses and
# the quality report. 1000 steps see 2.0 M tokens (~2.2 epochs of the training split); the lower learning rates
# follow the wider model (lr ~ 1 / width from the tiny one's 2e-3). Only the skip-tuned weights are committed (the
# repository holds one ~49 MiB copy); the untuned base stays in build/, its record in models/small-opt-kjv/pretrained.
small-model: NAME := small-opt-kjv
small-model: TOKENIZER := $(TINY)/skip-tuned/tokenizer.json
small-model: PRETRAIN_STEPS ?= 1000
small-model: PRETRAIN_LR := 1.5e-3
small-model: SKIPTUNE_STEPS ?= 3000
small-model: SKIPTUNE_LR := 4e-4
small-model: TUNE_SPEEDUPS := 1,2,3,5
small-model: CHECKPOINT_EVERY := 50

.PHONY: corpus tiny-model small-model finetune eval

# Write the public-domain KJV corpus (train / 5% held-out chapters) and the committed held-out sample.
corpus:
	$(SD) corpus --out $(CORPUS) --sample $(TINY)/heldout.txt

# Reproduce an embedded model end to end: corpus -> (tokenizer) -> pretrain -> skip-tune -> report + card.
tiny-model small-model: corpus
	$(if $(TRAIN_TOKENIZER),$(SD) train-tokenizer --data $(CORPUS)/kjv-train.txt --vocab-size 8192 --out $(TOKENIZER))
	$(SD) finetune --config configs/$(NAME).json --tokenizer $(TOKENIZER) \
	    --data $(CORPUS)/kjv-train.txt --heldout $(CORPUS)/kjv-heldout.txt --out build/$(NAME)/pretrained \
	    --speedups 1 --steps $(PRETRAIN_STEPS) --lr $(PRETRAIN_LR) --warmup-steps 100 \
	    --checkpoint-every $(CHECKPOINT_EVERY) --resume
	$(SD) finetune --model build/$(NAME)/pretrained --data $(CORPUS)/kjv-train.txt \
	    --heldout $(CORPUS)/kjv-heldout.txt --out build/$(NAME)/skip-tuned \
	    --speedups $(TUNE_SPEEDUPS) --steps $(SKIPTUNE_STEPS) --lr $(SKIPTUNE_LR) --warmup-steps 50 \
	    --checkpoint-every $(CHECKPOINT_EVERY) --resume
	mkdir -p models/$(NAME)/pretrained models/$(NAME)/skip-tuned
	cp $(addprefix build/$(NAME)/skip-tuned/,$(HF_FILES)) models/$(NAME)/skip-tuned/
	cp $(addprefix build/$(NAME)/pretrained/,$(if $(BASE_WEIGHTS),$(HF_FILES),$(BASE_RECORD))) models/$(NAME)/pretrained/
	$(if $(filter-out $(TINY),models/$(NAME)),cp $(TINY)/heldout.txt models/$(NAME)/heldout.txt)
	$(SD) eval --model models/$(NAME)/skip-tuned --base build/$(NAME)/pretrained --data $(TINY)/heldout.txt \
	    --max-layers 12 --min-layers 6 --max-layers 8 --min-layers 4 --json models/$(NAME)/quality.json \
	    --out-dir models/$(NAME)
	$(PY) -m skipdecode.training.model_card models/$(NAME)

# Skip-tune any OPT checkpoint: make finetune MODEL=opt-125m DATA="a.txt b.jsonl" [FT_STEPS=500 FT_OUT=dir].
finetune:
	$(SD) finetune --model $(MODEL) --data $(DATA) --out $(FT_OUT) --speedups $(TUNE_SPEEDUPS) --steps $(FT_STEPS) --resume

# Quality report (perplexity, agreement, ROUGE-L vs speedup; tuned vs untuned) into $(EVAL_OUT); ENGINE=dir
# takes the tuned model's continuations from its exported onnxruntime engine instead of the torch reference.
# The small embedded model: EVAL_MODEL=models/small-opt-kjv/skip-tuned EVAL_BASE= (its untuned base is in build/
# after `make small-model`: EVAL_BASE=build/small-opt-kjv/pretrained; without it the report has the tuned rows only).
eval:
	$(SD) eval --model $(EVAL_MODEL) $(if $(EVAL_BASE),--base $(EVAL_BASE)) $(if $(ENGINE),--engine $(ENGINE)) \
	    --json $(EVAL_OUT)/quality.json --out-dir $(EVAL_OUT)
