"""MODEL_CARD.md of the embedded models, rendered from the committed records (no training, no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from skipdecode.training.model_card import render

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny-opt-kjv"
RECORDS = ("pretrained/training.json", "skip-tuned/training.json", "pretrained/config.json", "quality.json")


def test_tiny_card_matches_the_committed_records():
    card = render(TINY)
    assert card.startswith("# tiny-opt-kjv\n")
    assert "| pretrained | tiny-opt-kjv.json | 1000 | 16 x 128 |" in card  # from pretrained/training.json
    assert "make tiny-model" in card and "\nmake eval " in card  # the default model needs no EVAL_MODEL


def test_small_card_names_its_own_target_and_paths(tmp_path):
    # the tiny model's records under the small model's name: the card's prose and commands follow the name
    small = tmp_path / "small-opt-kjv"
    for rel in RECORDS:
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY / rel, small / rel)
    card = render(small)
    assert card.startswith("# small-opt-kjv\n")
    assert "make small-model" in card and "corpus -> pretrain ->" in card
    # its untuned base's weights are not committed: the commands point at the build tree, the table says so
    assert "EVAL_MODEL=models/small-opt-kjv/skip-tuned EVAL_BASE=build/small-opt-kjv/pretrained #" in card
    assert "config and training record only" in card
    assert "the tiny model's (`tiny-opt-kjv`)" in card and str(tmp_path) not in card
    assert "23% of them" in card  # LM head share: 8192 x 192 of 6.96 M parameters


def test_unknown_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'opt-2'"):
        render(tmp_path / "opt-2")
