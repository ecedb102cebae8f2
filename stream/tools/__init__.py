"""Tooling around the event side: the local Kafka broker launcher and the child processes the demo,
the tests and the benchmarks start."""
