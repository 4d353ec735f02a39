"""``motionhook serve``: the web server and the worker in one process, one command.

gunicorn serves the app with one worker process of ``gthread`` threads; that
process also runs the motionhook worker on a thread of its own, built on the
app's very :class:`~service.extension.Services`. So on SQLite every commit of a
request sets the worker's in-process wake-up (``Database.local_wakeup``): no
polling while idle, no second process. On PostgreSQL the worker LISTENs as the
standalone one does. On SIGTERM the motionhook worker stops claiming, work in
flight gets ``MOTIONHOOK_SHUTDOWN_GRACE`` (the web side still serving, since that
work may need it: ModelsLab fetches uploaded images from /media) and what is left
is handed back for the next start; then gunicorn stops the web side gracefully.

One web process, not ``WEB_CONCURRENCY`` of them: a second process's commits could
not wake this worker on SQLite. Scale out with ``web`` + ``worker`` on PostgreSQL.

A cold start is mostly imports and building the app: hundreds of thousands of
objects that live as long as the process. The garbage collector, run over and over
while they are made, finds nothing to free and cost about 0.1 s of CPU (15 % of
the start), so ``motionhook serve`` starts with it off; each process freezes
what it has built (moved out of the collector's sight, which also keeps the fork's
pages shared) and turns it on before it does any work.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, request_finished
from gunicorn.app.base import Application

from service.observability import flush_all, set_component
from service.worker import Worker

# Time for gunicorn to wait for the worker process, past the worker's own grace.
EXIT_MARGIN = 5.0
DEFAULT_THREADS = 8
# The longest the worker waits for the web's first answer before it starts anyway.
WORKER_START_DELAY = 1.0


class ServeApplication(Application):  # type: ignore[misc]
    """gunicorn running one app, with the motionhook worker beside it in the same process."""

    def __init__(self, app_factory: Callable[[], Flask], options: dict[str, Any]) -> None:
        self.app_factory = app_factory
        self.options = options
        self.config_file: Path | None = options.pop("config_file", None)
        super().__init__()

    def load_config(self) -> None:
        if self.config_file is not None:
            self.load_config_from_file(str(self.config_file))
        for key, value in self.options.items():
            self.cfg.set(key, value)
        self.cfg.set("pre_fork", before_fork)
        self.cfg.set("post_fork", pause_collection)
        self.cfg.set("post_worker_init", start_worker)
        self.cfg.set("worker_exit", stop_worker)

    def load(self) -> Flask:
        return self.app_factory()


def collect_from_now_on() -> None:
    """Freeze what this process has built so far and turn the garbage collector on."""
    gc.freeze()
    gc.enable()


def before_fork(_arbiter: Any, _web_worker: Any) -> None:
    """gunicorn ``pre_fork``: the master has built all it will; collect from now on."""
    collect_from_now_on()


def pause_collection(_arbiter: Any, _web_worker: Any) -> None:
    """gunicorn ``post_fork``: no collections while the new worker process builds the app."""
    gc.disable()


# The motionhook worker of this (gunicorn worker) process and the thread running it.
_RUNNING: dict[str, Any] = {}


def start_worker(web_worker: Any) -> None:
    """gunicorn ``post_worker_init``: run the motionhook worker beside the web threads."""
    app: Flask = web_worker.wsgi
    collect_from_now_on()
    set_component("serve")
    worker = Worker(app.extensions["motionhook"], sole_writer=True)
    answered = threading.Event()

    def on_answer(_sender: Flask, **_extra: Any) -> None:
        answered.set()

    def run() -> None:
        # The web answers first: the request that woke a process scaled to zero (a
        # callback, a readiness probe) does not share the start with the worker's
        # first claims. Without a request the worker starts after WORKER_START_DELAY.
        answered.wait(WORKER_START_DELAY)
        request_finished.disconnect(on_answer, app)
        worker.run()

    request_finished.connect(on_answer, app, weak=False)
    thread = threading.Thread(target=run, name="motionhook-worker")
    _RUNNING.update(worker=worker, thread=thread)
    gunicorn_on_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        # The worker stops first and the web side keeps serving meanwhile: work in
        # flight may need this very process (ModelsLab fetching an uploaded image
        # from /media, a callback). Then gunicorn's own handler stops the web side.
        def stop_then_exit() -> None:
            worker.stop()
            thread.join(worker.settings.shutdown_grace + EXIT_MARGIN)
            if callable(gunicorn_on_term):
                gunicorn_on_term(signum, frame)

        threading.Thread(target=stop_then_exit, name="serve-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    thread.start()


def stop_worker(_arbiter: Any, _web_worker: Any) -> None:
    """gunicorn ``worker_exit``: stop the motionhook worker and wait for its hand-back."""
    worker: Worker | None = _RUNNING.get("worker")
    thread: threading.Thread | None = _RUNNING.get("thread")
    if worker is None or thread is None:
        return
    worker.stop()
    thread.join(worker.settings.shutdown_grace + EXIT_MARGIN)
    if worker.abandoned:
        # As run_worker: threads stuck past the grace would hold the exit; leases are back.
        flush_all()
        os._exit(0)


def serve(
    app_factory: Callable[[], Flask],
    *,
    bind: str,
    threads: int,
    shutdown_grace: float,
    config_file: Path | None,
) -> None:
    """Run gunicorn (one process, ``threads`` threads) and the worker until stopped."""
    options: dict[str, Any] = {
        "config_file": config_file,
        "bind": [bind],
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        # The app is built in the worker process, where the motionhook worker runs.
        "preload_app": False,
        "graceful_timeout": math.ceil(2 * (shutdown_grace + EXIT_MARGIN)),
    }
    ServeApplication(app_factory, options).run()
