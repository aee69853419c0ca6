"""Load benchmark of the sidecar: `make bench` runs it; docs/benchmarks.md explains it."""
