"""Benchmarks: throughput vs the cost model's ideal, HF generate and peers; serving load and soak runs."""
