# Skip-aware fine-tuning on a conditional-generation task, evaluated through exported engines (docs/finetune.md).
# The recipe: verse -> next verse from the KJV corpus; the embedded pretrained model is fine-tuned on it with the
# SkipDecode schedule (tuned) and at full depth (control, the untuned-for-skipping model), both are exported, and
# `skipdecode eval --task` generates held-out completions through each engine at 1x / 2x / 3x / 5x and lossless.
TASK_DIR ?= build/task
TASK_START ?= $(TINY)/pretrained
TASK_STEPS ?= 150
TASK_BATCH ?= 16
TASK_SEQ ?= 96
TASK_RECORDS ?= 64
TASK_DISTILL ?= 0
TASK_TRAIN_ARGS = --model $(TASK_START) --data $(TASK_DIR)/train.jsonl --steps $(TASK_STEPS) \
    --batch-size $(TASK_BATCH) --seq-len $(TASK_SEQ) --lr 5e-4 --warmup-steps 20 --prompt-range 8,32 --resume

.PHONY: task-data task-recipe

task-data: corpus
	$(SD) make-task --data $(CORPUS)/kjv-train.txt --out $(TASK_DIR)/train.jsonl
	$(SD) make-task --data $(CORPUS)/kjv-heldout.txt --out $(TASK_DIR)/test.jsonl --limit $(TASK_RECORDS)

# <= 15 min on 2 CPU cores: two fine-tunes, two exports, the engine evaluation; report in $(TASK_DIR)/report.md.
task-recipe: task-data $(VENV)/.extras-eval
	$(SD) finetune $(TASK_TRAIN_ARGS) --speedups $(TUNE_SPEEDUPS) --distill $(TASK_DISTILL) --out $(TASK_DIR)/tuned
	$(SD) finetune $(TASK_TRAIN_ARGS) --speedups 1 --out $(TASK_DIR)/control
	for m in tuned control; do $(SD) export --model $(TASK_DIR)/$$m --out $(TASK_DIR)/engine-$$m \
	    --speedups 2,3,5 --force; done
	$(SD) eval --task $(TASK_DIR)/test.jsonl --records $(TASK_RECORDS) --seq-len $(TASK_SEQ) \
	    --model $(TASK_DIR)/tuned --engine $(TASK_DIR)/engine-tuned \
	    --base $(TASK_DIR)/control --base-engine $(TASK_DIR)/engine-control \
	    --json $(TASK_DIR)/report.json --out-dir $(TASK_DIR)
