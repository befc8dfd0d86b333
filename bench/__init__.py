"""Benchmarks of the export service, run with ``python -m bench`` (``make bench``).

Every figure is reported next to a raw baseline measured in the same run on the same server,
because the machines this runs on are shared and noisy: an absolute number from one day says
little, a ratio to what PostgreSQL and asyncpg manage on that day says how much our code costs.
``bench/common.py`` holds what every benchmark needs (a server, a fresh database, a timed loop,
result files); each other module is one benchmark.
"""
