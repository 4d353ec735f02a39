"""Benchmarks for motionhook, run by hand (``make bench``), never as timed test assertions.

Each benchmark starts the real processes (gunicorn ``web``, ``motionhook worker``,
the ModelsLab simulator and local HTTP sinks) on 127.0.0.1 against PostgreSQL,
measures, and writes ``bench/results/<name>.json`` and ``bench/results/<name>.png``.

- :mod:`bench.ingest`: callbacks per second and latency at the callback endpoint,
  next to a bare Flask app on the same gunicorn config (the ceiling).
- :mod:`bench.notify`: from the simulator sending a callback to a sink receiving
  the notification, for 1 and 10 subscriptions, next to what a polling client gets.
- :mod:`bench.fanout`: deliveries per second from one and from two worker processes.
- :mod:`bench.footprint`: cold start of ``web`` and resident memory over 10,000 jobs.
"""
