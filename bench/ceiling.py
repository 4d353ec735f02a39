"""The ceilings for the ingest benchmark, served by motionhook's gunicorn config file.

``create_app``: a bare Flask app that parses the JSON and answers 200:

    gunicorn 'bench.ceiling:create_app()' -c deploy/gunicorn.conf.py

It has the callback route's shape (same path, same body) but no signature check,
no database and no schema, so the ratio motionhook/ceiling says what motionhook's
own work costs on top of gunicorn + Flask + JSON.

``create_sql_app``: the same bare app, plus the durable transaction a success
callback needs, written by hand in plain psycopg (no ORM, no schema, no state
machine): lock the job, record the result, swap its reconcile task for a download
task, wake the workers, keep the raw body, commit. The same eight round trips as
motionhook's; the ratio to it says what motionhook's framework and ORM cost on top
of the database work the transactional outbox requires.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
from flask import Flask, abort, request
from psycopg.types.json import Jsonb

from service.db import WAKEUP_CHANNEL


def create_app() -> Flask:
    """Build the bare app."""
    app = Flask(__name__)

    @app.post("/v1/callbacks/modelslab/<string:track_id>")
    def callback(track_id: str) -> tuple[dict[str, Any], int]:
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            abort(400)
        return {"received": True, "outcome": "applied"}, 200

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True}

    return app


def create_sql_app() -> Flask:
    """Build the bare app that also commits a success callback's transaction."""
    conninfo = os.environ["MOTIONHOOK_DATABASE_URL"]
    local = threading.local()
    app = Flask(__name__)

    def connection() -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(local, "connection", None)
        if conn is None or conn.closed:
            conn = local.connection = psycopg.connect(conninfo, autocommit=True)
        return conn

    @app.post("/v1/callbacks/modelslab/<string:track_id>")
    def callback(track_id: str) -> tuple[dict[str, Any], int]:
        raw = request.get_data()
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            abort(400)
        conn = connection()
        with conn.transaction():
            job = conn.execute(
                "SELECT status FROM jobs WHERE id = %s FOR UPDATE", (track_id,)
            ).fetchone()
            if job is None:
                abort(404)
            conn.execute(
                "UPDATE jobs SET upstream_status = 'success', source_urls = %s,"
                " updated_at = now() WHERE id = %s",
                (Jsonb(body.get("output") or []), track_id),
            )
            conn.execute("DELETE FROM tasks WHERE job_id = %s AND kind <> 'download'", (track_id,))
            conn.execute(
                "INSERT INTO tasks (kind, job_id, due_at, attempts, created_at)"
                " VALUES ('download', %s, now(), 0, now())"
                " ON CONFLICT (job_id, kind) DO UPDATE"
                " SET due_at = excluded.due_at, lease_owner = NULL",
                (track_id,),
            )
            conn.execute("SELECT pg_notify(%s, '')", (WAKEUP_CHANNEL,))
            conn.execute(
                "INSERT INTO callbacks (job_id, received_at, source, body, outcome, detail)"
                " VALUES (%s, now(), 'callback', %s, 'applied', 'success')",
                (track_id, raw.decode("utf-8", errors="replace")),
            )
        return {"received": True, "outcome": "applied"}, 200

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True}

    return app
