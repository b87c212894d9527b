"""GRIP Studio benchmarks (see README.md)."""
