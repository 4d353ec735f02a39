"""The per-process services every part of motionhook shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from service.config import Settings
from service.db import Database

if TYPE_CHECKING:
    from service.storage import Storage


@dataclass
class Services:
    """Settings, database and storage, built once per process."""

    settings: Settings
    db: Database
    storage: Storage = field(repr=False)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        from service.storage import open_storage

        return cls(
            settings=settings,
            db=Database(settings.database_url, listen_url=settings.database_listen_url),
            storage=open_storage(
                settings.storage_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                media_public_base_url=settings.media_public_base_url,
            ),
        )

    def media_url(self, key: str) -> str:
        """Return a durable, signed (or presigned) URL for a stored object."""
        from service.media import media_url

        return media_url(
            public_url=self.settings.public_url,
            secret=self.settings.callback_secret,
            key=key,
            ttl=self.settings.media_url_ttl,
            storage=self.storage,
        )


def services() -> Services:
    """Return the services of the current Flask app (web only: the worker has no app)."""
    from flask import current_app

    return cast(Services, current_app.extensions["motionhook"])
