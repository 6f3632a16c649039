"""Write MODEL_CARD.md of the embedded tiny model from what the build recorded (training.json of both
checkpoints, quality.json of the report), so `make tiny-model` regenerates the card with the numbers.

Usage: python -m skipdecode.training.model_card models/tiny-opt-kjv
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .quality import markdown_table

COMMANDS = """make install
make tiny-model        # corpus -> tokenizer -> pretrain -> skip-tune -> report -> this card
make eval              # the quality report again, into build/quality/"""


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


def render(model_dir: Path) -> str:
    pre = json.loads((model_dir / "pretrained" / "training.json").read_text())
    tuned = json.loads((model_dir / "skip-tuned" / "training.json").read_text())
    rows = json.loads((model_dir / "quality.json").read_text())
    cfg = json.loads((model_dir / "pretrained" / "config.json").read_text())
    total_min = (pre["wall_time_s"] + tuned["wall_time_s"]) / 60
    r0 = rows[0]
    held = f"{pre.get('heldout_chunks', '?')} chunks of {pre['train_config']['seq_len']} tokens"
    n_eval = r0["scored_tokens"] // (r0["seq_len"] - r0["prompt_length"])
    return f"""# tiny-opt-kjv

A {cfg['num_hidden_layers']}-layer OPT-architecture model trained from scratch on the King James Bible with this
repository's recipe, then fine-tuned with the SkipDecode layer-skipping policy. It exists so that the demo,
the exporter and the quality report run offline, in seconds, on a model whose text is readable. It is a toy:
it writes KJV-flavoured text and knows nothing else.

| checkpoint | what |
|---|---|
| `pretrained/` | full-depth pretraining (speedup 1 only): the untuned base of the ablation |
| `skip-tuned/` | `pretrained/` fine-tuned with the SkipDecode layer sets (speedups drawn per batch) |
| `heldout.txt` | the first held-out chapters (~80 KB), for evaluation on a fresh clone |
| `quality.json`, `quality.md`, `quality.png` | the quality report below |

## Data and licence

Authorized King James Version (1611), from the Debian package `bible-kjv` (`bible -f Gen1:1-Rev22:21`).
The text is in the public domain. One document per chapter; every 20th chapter (5%, {held}) is held out;
training uses the other {pre['train_chunks']} chunks. The KJV repeats itself (Kings/Chronicles, the gospels),
so held-out numbers compare models and schedules; they do not measure generalisation beyond this text.

## Model and tokenizer

OPT, pre-LN, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads,
FFN {cfg['ffn_dim']}, {cfg['max_position_embeddings']} positions, vocabulary {cfg['vocab_size']}, tied embeddings:
{pre['params'] / 1e6:.2f} M parameters, stored in fp16 (`model.safetensors`). Tokenizer: byte-level BPE trained on
the training split (`tokenizers`), OPT's special ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3), and like OPT
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

Total training wall time {total_min:.1f} min (torch {pre['torch']}, 2-core CPU shared with other work).
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
{COMMANDS}
```
"""


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0] if argv else "models/tiny-opt-kjv")
    (model_dir / "MODEL_CARD.md").write_text(render(model_dir))
    print(f"wrote {model_dir / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
