"""Data and metrics of the kjv_heldout task: the JSONL beside this file, no download."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("heldout.jsonl")


def load_docs(**_kwargs):
    """-> {"test": Dataset} of {"id", "text"} rows (the harness passes the task metadata as keyword arguments)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    """One summed log-likelihood per document -> the (loglikelihood, count) pairs the perplexity metrics weigh."""
    (loglikelihood,) = results
    words, size = len(doc["text"].split()), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}



def all_but_last_word(doc):
    """The cloze task's context: the verse without its last word (LAMBADA style)."""
    return doc["text"].rsplit(" ", 1)[0]


def last_word(doc):
    """The cloze task's continuation: the verse's last word (with its punctuation), after a space."""
    return " " + doc["text"].rsplit(" ", 1)[1]
