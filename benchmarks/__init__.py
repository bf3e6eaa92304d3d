"""Benchmarks: latency, throughput and accuracy of every engine, and training speed (not built yet)."""
