"""Write MODEL_CARD.md of an embedded model (models/tiny-opt-kjv, models/small-opt-kjv) from what the build recorded
(training.json of both checkpoints, quality.json of the report), so `make tiny-model` / `make small-model` regenerate
the card with the numbers. What each model is for (the prose that no record holds) is in `PURPOSES`.

Usage: python -m skipdecode.training.model_card models/tiny-opt-kjv
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .quality import markdown_table

DEFAULT = "tiny-opt-kjv"  # the model `make eval` and the demo use unless told otherwise


@dataclass(frozen=True)
class Purpose:
    why: str  # what the model exists for
    tokenizer: str  # where its tokenizer comes from
    sizing: str  # how its size and training length were chosen
    target: str  # the make target that rebuilds it
    base_committed: bool = True  # the untuned base's weights are in the repository (else only its record)


PURPOSES = {
    "tiny-opt-kjv": Purpose(
        why="It exists so that the demo,\nthe exporter and the quality report run offline, in seconds, on a model "
            "whose text is readable.",
        tokenizer="byte-level BPE trained on\nthe training split (`tokenizers`)",
        sizing="Steps chosen to fit ~35 min on a 2-core CPU.",
        target="tiny-model"),
    "small-opt-kjv": Purpose(
        why="It exists so that the bench has a\ntrained, skip-tuned model whose batch-1 decoding is bound by reading "
            "its weights (they are\nmany times the last-level cache of a typical CPU), as it is for real OPT "
            "checkpoints; the tiny model's\nstep is mostly session overhead.",
        tokenizer="the tiny model's (`tiny-opt-kjv`), a byte-level BPE\ntrained on the training split (`tokenizers`): "
                  "a small vocabulary keeps the LM head a small share of the weights",
        sizing="3.1 s per step of 16 x 128 tokens on an idle 2-core CPU (3.5x the tiny model's FLOPs): 1000\n"
               "pretraining + 3000 skip-tuning steps are ~3.5 h, plus the held-out losses and this report. The\n"
               "skip-tuning ran in four resumed stretches (500 steps drawing speedups 2, 3, 5; then 1000, 500 and\n"
               "1000 more drawing 1, 2, 3, 5, each resume stretching the cosine schedule to the new step count):\n"
               "with full depth drawn too, its own perplexity keeps improving while the skipped depths are tuned.\n"
               "Learning rates scale the tiny model's as 1 / width. Only the skip-tuned weights are committed (one\n"
               "~49 MiB copy); `pretrained/` holds the base's config and training record, and `make small-model`\n"
               "rebuilds its weights under build/.",
        target="small-model", base_committed=False),
}


def _fmt_train(name: str, t: dict) -> str:
    c = t["train_config"]
    speedups = ", ".join(f"{s:g}" for s in c["speedups"])
    start = Path(t["start"]["model"]).name + "/" if t["start"]["model"] else t["start"]["config"]
    return (f"| {name} | {start} | {t['steps']} | {c['batch_size']} x "
            f"{c['seq_len']} | {t['tokens_seen'] / 1e6:.2f} M | {c['lr']:g} | {speedups} | "
            f"{t['wall_time_s'] / 60:.1f} min | {t['final_train_loss']:.3f} | {t['heldout_loss']:.3f} | "
            f"{t['heldout_perplexity']:.2f} |")


def _targets(rows: list[dict]) -> str:
    out = []
    for role in ("tuned", "base"):
        mine = {r["label"]: r for r in rows if r.get("role") == role}
        for label, limit in (("2x", 0.05), ("3x", 0.10)):
            if label not in mine:
                continue
            r = mine[label]
            line = f"- {r['model']} at {label}: perplexity {100 * (r['ppl_ratio'] - 1):+.1f}% vs its own full depth"
            if role == "tuned":
                line += f" (target <= +{100 * limit:.0f}%): {'met' if r['ppl_ratio'] - 1 <= limit else 'missed'}"
            else:
                line += " (untuned ablation)"
            out.append(line)
    return "\n".join(out)


def _sizing(cfg: dict, params: int) -> str:
    """Bytes a full-depth decode step reads (every weight once, fp32 as exported) and the LM head's share."""
    head = cfg["vocab_size"] * cfg["hidden_size"]
    return (f"{params * 4 / 2**20:.0f} MiB of fp32 weights\n(what a full-depth decode step reads; "
            f"{params * 2 / 2**20:.0f} MiB in fp16 here), the LM head (= the tied token embedding)\n"
            f"{100 * head / params:.0f}% of them")


def _base_dir(name: str, purpose: Purpose) -> str:
    """Where the untuned base's weights are: committed, or (too large to commit twice) in the build tree."""
    return f"models/{name}/pretrained" if purpose.base_committed else f"build/{name}/pretrained"


def _commands(name: str, purpose: Purpose) -> str:
    phases = "corpus -> tokenizer -> pretrain" if purpose.target == "tiny-model" else "corpus -> pretrain"
    # `make eval` reports on the default (tiny) model unless told which
    which = "" if name == DEFAULT else f" EVAL_MODEL=models/{name}/skip-tuned EVAL_BASE={_base_dir(name, purpose)}"
    return (f"make install\n"
            f"make {purpose.target:<18}# {phases} -> skip-tune -> report -> this card\n"
            f"{'make eval' + which:<22} # the quality report again, into build/quality/")


def render(model_dir: Path) -> str:
    name = model_dir.resolve().name
    if name not in PURPOSES:
        raise SystemExit(f"model_card: unknown model {name!r}; known: {sorted(PURPOSES)}")
    purpose = PURPOSES[name]
    pre = json.loads((model_dir / "pretrained" / "training.json").read_text())
    tuned = json.loads((model_dir / "skip-tuned" / "training.json").read_text())
    rows = json.loads((model_dir / "quality.json").read_text())
    cfg = json.loads((model_dir / "pretrained" / "config.json").read_text())
    total_min = (pre["wall_time_s"] + tuned["wall_time_s"]) / 60
    r0 = rows[0]
    held = f"{pre.get('heldout_chunks', '?')} chunks of {pre['train_config']['seq_len']} tokens"
    n_eval = r0["scored_tokens"] // (r0["seq_len"] - r0["prompt_length"])
    steps = pre["steps"] + tuned["steps"]
    per_step = (pre["wall_time_s"] + tuned["wall_time_s"]) / steps
    train_rows = pre.get("train_rows", pre.get("train_chunks"))  # the key's older name
    base_note = "" if purpose.base_committed else \
        f" (config and training record only; `make {purpose.target}` rebuilds the weights in build/)"
    return f"""# {name}

A {cfg['num_hidden_layers']}-layer OPT-architecture model trained from scratch on the King James Bible with this
repository's recipe, then fine-tuned with the SkipDecode layer-skipping policy. {purpose.why} It is a toy:
it writes KJV-flavoured text and knows nothing else.

| checkpoint | what |
|---|---|
| `pretrained/` | full-depth pretraining (speedup 1 only): the untuned base of the ablation{base_note} |
| `skip-tuned/` | `pretrained/` fine-tuned with the SkipDecode layer sets (speedups drawn per batch) |
| `heldout.txt` | the first held-out chapters (~80 KB), for evaluation on a fresh clone |
| `quality.json`, `quality.md`, `quality.png` | the quality report below |

## Data and licence

Authorized King James Version (1611), from the Debian package `bible-kjv` (`bible -f Gen1:1-Rev22:21`).
The text is in the public domain. One document per chapter; every 20th chapter (5%, {held}) is held out;
training uses the other {train_rows} chunks. The KJV repeats itself (Kings/Chronicles, the gospels),
so held-out numbers compare models and schedules; they do not measure generalisation beyond this text.

## Model and tokenizer

OPT, pre-LN, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads,
FFN {cfg['ffn_dim']}, {cfg['max_position_embeddings']} positions, vocabulary {cfg['vocab_size']}, tied embeddings:
{pre['params'] / 1e6:.2f} M parameters, stored in fp16 (`model.safetensors`): {_sizing(cfg, pre['params'])}.
Tokenizer: {purpose.tokenizer}, OPT's special ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3), and like OPT
every encoded prompt starts with `</s>`.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear LR warm-up then cosine to 10%, gradient
clipping 1.0, no dropout, seed 0, fp32 on CPU with 2 torch threads. Skip-tuning draws one target speedup per
batch and a prompt length p ~ U{list(tuned['train_config']['prompt_range'])}; columns < p run at full depth,
later columns the decayed budgets of the inference schedule (see `training/finetune.py`). Loss on every position.

| run | start | steps | batch | tokens | lr | speedups | wall time | final train loss | held-out loss | held-out ppl |
|---|---|---|---|---|---|---|---|---|---|---|
{_fmt_train('pretrained', pre)}
{_fmt_train('skip-tuned', tuned)}

Total training wall time {total_min:.1f} min, {per_step:.1f} s per step (torch {pre['torch']}, 2-core CPU shared
with other work). {purpose.sizing}
Final train loss = mean of the last 50 steps (mixed speedups for skip-tuning); held-out loss = full depth,
every position of every held-out chunk of the whole 5% split.

## Quality (held-out, `heldout.txt`)

{n_eval} chunks of {r0['seq_len']} tokens; prompt {r0['prompt_length']} tokens at full depth, then
{r0['seq_len'] - r0['prompt_length']} scored / generated tokens under the schedule. Perplexity and agreement
are teacher-forced; ROUGE-L and overlap compare greedy continuations (token ids) with the reference text and
with the same model's full-depth continuation. Mean layers: realised per generated token (the first one comes
from the full-depth prefill).

{markdown_table(rows)}
Targets (skip-tuned: +5% at 2x, +10% at 3x over its own full depth):

{_targets(rows)}

Caveat: the skip-tuned model also saw {tuned['tokens_seen'] / 1e6:.1f} M more training tokens than the base, which is
why its full-depth perplexity is lower; the comparison that isolates skipping is each model against its own
full depth (the "vs 1x" column).

![quality vs speedup](quality.png)

## Reproduce

```bash
{_commands(name, purpose)}
```
"""


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0] if argv else "models/tiny-opt-kjv")
    (model_dir / "MODEL_CARD.md").write_text(render(model_dir))
    print(f"wrote {model_dir / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
