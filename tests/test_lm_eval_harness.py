"""lm-evaluation-harness (`lm-eval`) evaluates the served tiny KJV engine through its `local-completions` model
(the OpenAI completions API: token-id prompts, `echo: true, logprobs: 1, max_tokens: 1`) on the repository's
`tasks/kjv_heldout` tasks (local data, no download): `kjv_heldout` (loglikelihood_rolling: whole verses after a
`</s>` prefix) and `kjv_heldout_cloze` (loglikelihood: a verse's last word given the rest). Each document's
log-likelihood that the harness sums from the served echoed log-probabilities equals our own teacher-forced
scoring of the same tokens (`Service.score`, full depth) within TOL, and the cloze task's greedy flag equals
ours; negative controls (another document's scoring, the verse without its prefix token) are far outside TOL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

for _module in ("lm_eval", "transformers", "httpx", "starlette", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module, reason="needs the export, dev and serve extras: pip install -e .[export,dev,serve]")

from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.service import Service  # noqa: E402

from skipdecode.serve.app import create_app  # noqa: E402
from skipdecode.serve.config import ServeConfig  # noqa: E402

from .serving_fakes import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("kjv_heldout", "kjv_heldout_cloze")
PREFIX = 2  # OPT's </s>: the context of a document's first token (the engine's tokenizer.json names no BOS)
LIMIT = 12  # documents per task (the cloze task's include greedy and non-greedy last words): well under a minute
TOL = 1e-4  # absolute, on a document's summed log-likelihood: the same engine over HTTP or not (seen: identical)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """-> (harness results with samples, the engine, the harness's tokenizer), both tasks in one harness run."""
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    from skipdecode.cli import main

    out = tmp_path_factory.mktemp("kjv") / "engine"
    assert main(["export", "--model", str(ROOT / "models" / "tiny-opt-kjv" / "skip-tuned"), "--out", str(out),
                 "--speedups", "2", "--no-progress", "--lossless-policy", "default"]) in (0, None)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        with Engine.load(out) as engine:
            with Service(engine) as svc, serve_in_thread(
                    create_app(engine, svc, ServeConfig(model_name="kjv"))) as (url, _):
                args = {"base_url": f"{url}/v1/completions", "model": "kjv", "tokenizer_backend": "huggingface",
                        "tokenizer": str(out), "tokenized_requests": True, "custom_prefix_token_id": PREFIX,
                        "max_length": engine.backend.max_length, "num_concurrent": 1, "batch_size": 1,
                        "max_retries": 1}
                results = lm_eval.simple_evaluate(
                    model="local-completions", model_args=args, tasks=list(TASKS), limit=LIMIT, log_samples=True,
                    task_manager=TaskManager(include_path=str(ROOT / "tasks")), bootstrap_iters=0)
            yield results, engine, transformers.AutoTokenizer.from_pretrained(str(out))


def _samples(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc"]["id"])
    assert len(samples) == LIMIT
    return samples


def test_rolling_loglikelihood_equals_our_scoring(evaluated):
    results, engine, hf = evaluated
    samples = _samples(results, "kjv_heldout")
    texts = [s["doc"]["text"] for s in samples]
    harness = [float(s["resps"][0][0]) for s in samples]
    ours, bare = [], []
    with Service(engine) as svc:  # the server closed its service on shutdown
        for text in texts:
            ids = engine.codec.encode(text)  # our codec starts a text with </s>, as OPT was trained
            assert ids[0] == PREFIX and ids[1:] == hf(text, add_special_tokens=False).input_ids
            ours.append(sum(e.logprob for e in svc.score(ids).result(60)))
            bare.append(sum(e.logprob for e in svc.score(ids[1:]).result(60)))  # no prefix: one token fewer
    for h, o in zip(harness, ours, strict=True):
        assert math.isfinite(h) and h < 0
        assert abs(h - o) < TOL, (h, o)
    assert min(abs(h - o) for h, o in zip(harness, ours[1:] + ours[:1], strict=True)) > 100 * TOL  # another doc
    assert min(abs(h - b) for h, b in zip(harness, bare, strict=True)) > 100 * TOL  # first token unscored
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bpb = results["results"]["kjv_heldout"]["bits_per_byte,none"]
    assert bpb == pytest.approx(-sum(harness) / total_bytes / math.log(2), rel=1e-9)


def test_continuation_loglikelihood_and_greedy_flag_equal_our_scoring(evaluated):
    results, engine, hf = evaluated
    samples = _samples(results, "kjv_heldout_cloze")
    ours = []
    with Service(engine) as svc:
        for s in samples:
            context, continuation = s["arguments"][0][0], s["arguments"][0][1]
            assert context and continuation.startswith(" ") and context + continuation == s["doc"]["text"]
            # the harness tokenizes the whole text, then cuts off the context's tokens (no prefix token: the
            # context is not empty)
            whole = hf(context + continuation, add_special_tokens=False).input_ids
            n = len(whole) - len(hf(context, add_special_tokens=False).input_ids)
            assert n > 0
            tail = svc.score(whole, 1).result(60)[-n:]
            ours.append((sum(e.logprob for e in tail), all(e.top[0][0] == e.token for e in tail)))
    harness = [(float(s["resps"][0][0][0]), bool(s["resps"][0][0][1])) for s in samples]
    for (h, h_greedy), (o, o_greedy) in zip(harness, ours, strict=True):
        assert math.isfinite(h) and h < 0 and abs(h - o) < TOL, (h, o)
        assert h_greedy == o_greedy
    assert {g for _, g in ours} == {True, False}  # the greedy flag is checked both ways
    assert min(abs(h - o) for (h, _), (o, _) in zip(harness, ours[1:] + ours[:1], strict=True)) > 100 * TOL
    acc = results["results"]["kjv_heldout_cloze"]["acc,none"]
    assert acc == pytest.approx(sum(g for _, g in ours) / LIMIT)
