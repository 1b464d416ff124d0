"""Benchmark harness: long-context tasks, runners and honest measurements of KV-cache methods."""
