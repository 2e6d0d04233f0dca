"""The benchmark book's workloads (``/work/shared/WORKLOADS.md``), each beside its raw baseline.

Run ``python -m benchmarks`` (or ``make bench``); ``--help`` lists the filters. Every figure is
measured with the producer, consumers and services in their own OS processes (spawned through
:mod:`benchmarks.child`), and every raw-client baseline runs in the same invocation as the
framework figure it is compared with, so that the ratio holds even where absolute numbers move.
"""
