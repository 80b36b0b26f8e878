"""Helpers of the benchmarks that run real processes: a canned upstream, a loopback load generator, process control."""
