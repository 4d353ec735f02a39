"""motionhook: ModelsLab image-to-video jobs with signed callbacks and fan-out.

``create_app`` is the only entry point for gunicorn, the tests and the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from service.config import DEFAULTS, Settings
from service.extension import Services

UPLOAD_OVERHEAD = 64 * 1024


def create_app(test_config: Mapping[str, Any] | None = None, *, api: bool = True) -> Flask:
    """Build the web application: config, services, blueprints.

    ``api=False`` leaves out the HTTP API (blueprints, OpenAPI, rate limits): the
    worker and the CLI commands serve no routes, and without them the worker
    process starts faster and stays smaller.
    """
    instance_path = os.environ.get("MOTIONHOOK_INSTANCE_PATH") or str(Path.cwd() / "instance")
    app = Flask(__name__, instance_path=instance_path)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("MOTIONHOOK")
    if test_config:
        app.config.from_mapping(test_config)
    settings = Settings.from_mapping(app.config, Path(app.instance_path))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + UPLOAD_OVERHEAD
    app.extensions["motionhook"] = Services.build(settings)

    from service.observability import init_app as init_observability

    init_observability(app, settings)
    if api:
        from service.api import register_api

        register_api(app)
    return app
