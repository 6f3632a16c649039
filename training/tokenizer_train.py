"""Train a byte-level BPE tokenizer (HF `tokenizers`, offline) laid out like OPT's.

OPT compatibility: the special tokens take the ids OPT uses (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3), and a
template post-processor prepends `</s>` (id 2, OPT's BOS) to every encoded sequence, as OPT's GPT-2 style
tokenizer does. Byte-level pre-tokenisation without a prefix space, so any text round-trips and decoding
with `skip_special_tokens` gives the text back. The result is one `tokenizer.json`, read by
`skipdecode.runtime.tokenizer.TextCodec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..runtime.errors import InputError

# Order matters: trainers assign special tokens the first ids in list order.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
OPT_BOS = "</s>"  # OPT prefixes prompts with </s> (id 2), not <s>


def train_bpe(docs: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE on `docs`. 8192 entries keep the embedding of a tiny model small (8192 x d)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InputError(f"vocab_size={vocab_size} is below the minimum {256 + len(SPECIAL_TOKENS)} "
                         f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)")
    if not docs:
        raise InputError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    for name, want in zip(SPECIAL_TOKENS, (BOS_ID, PAD_ID, EOS_ID, UNK_ID), strict=True):
        got = tok.token_to_id(name)
        assert got == want, f"special token {name} got id {got}, expected {want}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{OPT_BOS} $A", pair=f"{OPT_BOS} $A {OPT_BOS} $B", special_tokens=[(OPT_BOS, EOS_ID)])
    return tok


def train_tokenizer_file(docs: Sequence[str], out: str | Path, vocab_size: int = 8192) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(docs, vocab_size)
    tmp = out.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return out
