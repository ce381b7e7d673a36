"""The benchmark: `python -m tests.bench` (or `make bench`).

It drives tasks through the real pipeline (every service as an OS process on an
embedded nats-server) and, in the same run, the same number of messages through
a raw floor with the pipeline's JetStream hops, each handler empty; it reports throughput, latency, the
ratio to the floor and each process's peak memory. It reports, it never asserts.

Modules: `common` (drive loop, percentiles, process sampling), `pipeline`,
`floor` (also the hop process), `report` (table and JSON), `__main__` (CLI).
"""
