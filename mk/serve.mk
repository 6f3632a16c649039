# Serving: the HTTP server over engine OUT, the continuous-vs-static batching benchmark and a soak run.
PORT ?= 8000
SERVE_BENCH_JSON ?= build/serve_bench.json
SOAK_JSON ?= build/soak.json
SOAK_SECONDS ?= 600

PREFILL_BENCH_JSON ?= build/prefill_bench.json
SCORING_BENCH_JSON ?= build/scoring_bench.json

.PHONY: serve serve-bench prefill-bench scoring-bench soak

# Serve OUT on http://127.0.0.1:$(PORT): OpenAI-style POST /v1/completions (SSE streaming), GET /health, GET /metrics.
serve:
	$(SD) serve --engine $(OUT) --host 127.0.0.1 --port $(PORT)

# Continuous (gate, group) vs static batching under Poisson arrivals at 1x/2x/3x plus gate-vs-group step timings.
serve-bench:
	$(PY) -m skipdecode.bench.serve_bench --engine $(OUT) --requests 64 --rate 40 --repeats 3 --json $(SERVE_BENCH_JSON)

# Inter-token latency of 4 streams while a prompt as long as the KV window is admitted, one-call vs chunked prefill.
prefill-bench:
	$(PY) -m skipdecode.bench.prefill_bench --engine $(OUT) --budgets 0,32,64 --rounds 7 --threads 1 \
		--json $(PREFILL_BENCH_JSON)

# An ordinary request's time to first token while 8 prompts of 255 tokens are scored (echo + logprobs), vs idle.
scoring-bench:
	$(PY) -m skipdecode.bench.scoring_bench --engine $(OUT) --scorers 8 --score-prompt 255 --rounds 9 --threads 1 \
		--json $(SCORING_BENCH_JSON)

# Soak `skipdecode serve` for SOAK_SECONDS under mixed load (cancels, streams); reports server memory over time.
soak:
	$(PY) -m skipdecode.bench.serve_soak --engine $(OUT) --duration $(SOAK_SECONDS) --json $(SOAK_JSON)
