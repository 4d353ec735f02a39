"""gunicorn settings for motionhook's web process; every value can come from the environment.

Run as ``gunicorn 'service:create_app()' -c deploy/gunicorn.conf.py`` (the Procfile's
``web``). Logs (gunicorn's own and the access log) are JSON lines on stdout, with
the query string redacted. Prometheus counters of all worker processes are added
up through ``PROMETHEUS_MULTIPROC_DIR``: set it to an empty folder (a tmpfs is
best), or this file creates a private one and removes it at exit.
"""

import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

# prometheus_client decides at import time whether it runs in multiprocess mode, so
# this must happen before anything imports it (the app is loaded after this file).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OWNED_MARKER = "MOTIONHOOK_OWNS_METRICS_DIR"
if not os.environ.get(MULTIPROC_ENV):
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="motionhook-metrics-")
    os.environ[OWNED_MARKER] = os.environ[MULTIPROC_ENV]

bind = os.environ.get("GUNICORN_BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count() * 2)))
# gevent: every connection is a greenlet, so slow clients (a body trickled a byte at a
# time, an open event stream) cost a socket each, not a thread. Measured on loopback:
# 200 such connections stopped /healthz answering for as long as they lasted under
# gthread (4 workers x 4 threads: each trickling client holds a thread until its body
# is read); under gevent /healthz kept answering within 0.2 s, and within 1.4 s with
# 800 (README "Security"; tests/test_e2e_slow_clients.py). Reading a request's
# headers is bounded by ``keepalive`` seconds; a body is read as the app asks for it.
# requests cooperates with gevent once gunicorn has patched the standard library in
# each worker, and psycopg with a cooperative wait function (see post_worker_init).
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
# Open connections per worker (gevent), slow ones and event streams included; beyond
# it a worker stops accepting until one closes.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# Only for GUNICORN_WORKER_CLASS=gthread.
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# With gthread, load the app once in the master and fork the workers from it (a cold
# start of about 0.85 s instead of 1.3-1.5 s on 2 cores). Not with gevent: gunicorn
# monkey-patches the standard library in each worker after the fork, so an app loaded
# before it would keep unpatched threads and locks (Flask-Limiter's timer thread
# breaks after the fork). A code change needs a restart, not a HUP.
preload_app = os.environ.get("GUNICORN_PRELOAD", "0" if worker_class == "gevent" else "1") == "1"
# An event stream (GET /v1/events/stream) holds a gthread thread for as long as it is
# open: by default let streams take at most half of them, so requests always find one.
if worker_class == "gthread":
    os.environ.setdefault("MOTIONHOOK_STREAMS_MAX", str(max(1, threads // 2)))
# A request is never slow on purpose (no network I/O in requests): 30 s means stuck.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# On SIGTERM, stop accepting and let requests in flight finish for this long.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "0"))
# Which proxies may set X-Forwarded-Proto/-For; "*" behind a PaaS router or an ingress.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# Containers often have a disk-backed /tmp; the worker heartbeat file belongs in memory.
if Path("/dev/shm").is_dir():
    worker_tmp_dir = "/dev/shm"
accesslog = "-" if os.environ.get("GUNICORN_ACCESS_LOG", "1") == "1" else None
errorlog = "-"
loglevel = os.environ.get("MOTIONHOOK_LOG_LEVEL", "INFO").upper()

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "service.observability.JsonFormatter"},
        "access": {"()": "service.observability.AccessLogFormatter"},
    },
    "handlers": {
        "console": {"class": "service.observability.StdoutHandler", "formatter": "json"},
        "access": {"class": "service.observability.StdoutHandler", "formatter": "access"},
    },
    "root": {"level": "WARNING", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel, "handlers": ["console"], "propagate": False},
        "gunicorn.access": {
            "level": "INFO",
            "handlers": ["access"] if accesslog else [],
            "propagate": False,
        },
    },
}


def _metrics_dir() -> Path:
    return Path(os.environ[MULTIPROC_ENV])


def on_starting(server):
    """Start from an empty metrics folder: files of a previous run would be added in."""
    folder = _metrics_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def post_worker_init(worker):
    """Make database waits cooperative; on SIGTERM, end event streams first.

    psycopg picks its wait function when it is first imported. Imported after gevent
    has patched this worker, it picks a cooperative one by itself; imported earlier
    (in the master, before the fork), its C wait would block every greenlet of the
    worker while one query runs, so it is switched to ``wait_select``, which calls
    the patched ``select.select``. A worker without PostgreSQL never loads psycopg.
    Event streams would hold the worker for graceful_timeout on SIGTERM.
    """
    import signal

    from service.streams import stop_streams

    waiting = sys.modules.get("psycopg.waiting")
    if waiting is not None and worker.cfg.worker_class_str == "gevent":
        waiting.wait = waiting.wait_select

    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):
        stop_streams()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop)


def child_exit(server, worker):
    """Drop a dead worker's live gauges (its counters stay, as Prometheus expects)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder if this file created it."""
    owned = os.environ.get(OWNED_MARKER)
    if owned and owned == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(owned, ignore_errors=True)
