"""Benchmarks: bench/run.py (sockproxy against its peers) and bench/crypto_micro.py."""
