"""Developer tools shared by tests and benchmarks (not part of the deployable runtime)."""
