"""Benchmarks: each prints its numbers and ratios against a reference measured in the same run."""
