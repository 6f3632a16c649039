# Benchmark: throughput, SkipDecode speedup vs the cost model's ideal, HF generate, memory, length scaling.
BENCH_OUT ?= build/bench
BENCH_ARGS ?=

.PHONY: bench bench-quick

# Full benchmark: embedded model + opt-125m/350m/1.3b shapes (random weights), batches 1/8/32 (long; see docs/benchmarks.md).
bench: $(VENV)/.extras-peers
	$(SD) bench --out-dir $(BENCH_OUT) $(BENCH_ARGS)

# A few minutes on 2 cores: embedded model + opt-125m, batches 1 and 8, 32 new tokens.
bench-quick: $(VENV)/.extras-peers
	$(SD) bench --quick --out-dir $(BENCH_OUT)/quick $(BENCH_ARGS)
