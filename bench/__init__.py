"""Benchmarks run by `make bench`: each prints its figures; results land in bench/results.json."""
