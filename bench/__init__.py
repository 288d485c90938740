"""Benchmarks run by `make bench`: each prints its figures; results land in bench/results.json."""

# Before any benchmark imports pyarrow: meterlake chooses Arrow's allocator when imported (as in any meterlake process).
import meterlake  # noqa: F401
