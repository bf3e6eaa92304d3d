"""Benchmarks: latency, throughput and accuracy of every engine, the method's ablation and gate, training speed."""
