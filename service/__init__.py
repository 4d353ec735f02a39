"""motionhook: ModelsLab image-to-video jobs with signed callbacks and fan-out.

``create_app`` builds the web application for gunicorn and the tests. The worker
and the other commands build only :class:`~service.extension.Services` (see
``service.cli.load_services``) and never import Flask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

UPLOAD_OVERHEAD = 64 * 1024


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web application: config, services, logging, the HTTP API."""
    # Imported here, not at the top: ``import service.cli`` (every command) stays light.
    from flask import Flask

    from service.api import inputs, register_api
    from service.config import Settings, instance_path, load_config
    from service.extension import Services
    from service.observability import init_app as init_observability

    config = load_config(test_config)
    settings = Settings.from_mapping(config, instance_path())
    app = Flask(__name__, instance_path=str(settings.instance_path))
    app.config.from_mapping(config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + UPLOAD_OVERHEAD
    app.extensions["motionhook"] = Services.build(settings)
    init_observability(app, settings)
    register_api(app)
    inputs.init_app(app)
    return app
