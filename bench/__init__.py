"""Soko's benchmarks: each prints its figures; none is run by the test suite."""
