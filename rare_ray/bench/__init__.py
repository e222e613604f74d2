"""Benchmarks users can run on their own machines and clusters (``rare-ray bench ...``)."""
