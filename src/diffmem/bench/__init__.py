"""Benchmarks on labelled prompt sets."""
