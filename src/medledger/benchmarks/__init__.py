"""Benchmark harnesses behind `medledger bench`."""
