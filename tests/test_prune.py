"""``prune`` and ``motionhook prune``: old callbacks, delivery bodies and media go, in batches."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, BinaryIO

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.cli import main
from service.config import parse_duration
from service.extension import Services
from service.models import (
    CallbackRecord,
    Delivery,
    DeliveryAttempt,
    Event,
    Job,
    JobStatus,
    new_id,
    utcnow,
)
from service.prune import PruneReport, prune
from service.storage import Storage, StoredObject

MONTH = timedelta(days=30)
MP4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


def add_job(
    services: Services,
    *,
    finished_days_ago: float | None,
    status: str = JobStatus.COMPLETED,
    outputs: int = 1,
    upload: bool = False,
) -> str:
    """Insert a job with ``outputs`` stored videos (and an uploaded input with ``upload``)."""
    job_id = new_id("job")
    job_input: dict[str, Any] = {"prompt": "hills"}
    if upload:
        key = f"inputs/{job_id}.png"
        services.storage.put(key, io.BytesIO(PNG), content_type="image/png")
        job_input["image_key"] = key
    else:
        job_input["init_image"] = "https://example.com/a.png"
    stored = []
    for index in range(outputs):
        key = f"outputs/{job_id}/{index}.mp4"
        put = services.storage.put(key, io.BytesIO(MP4), content_type="video/mp4")
        stored.append(
            {
                "key": key,
                "source_url": f"https://cdn.example/{index}.mp4",
                "content_type": "video/mp4",
                "bytes": put.size,
                "sha256": "0" * 64,
            }
        )
    finished = ago(finished_days_ago) if finished_days_ago is not None else None
    created = ago((finished_days_ago or 0) + 0.01)
    with services.db.transaction() as session:
        session.add(
            Job(
                id=job_id,
                status=status,
                model_id="wan2.2",
                input=job_input,
                metadata_={},
                source_urls=[item["source_url"] for item in stored],
                outputs=stored,
                created_at=created,
                updated_at=finished or created,
                completed_at=finished,
            )
        )
    return job_id


def add_callbacks(services: Services, days_ago: float, count: int) -> None:
    with services.db.transaction() as session:
        for _ in range(count):
            session.add(
                CallbackRecord(
                    job_id="job_x",
                    received_at=ago(days_ago),
                    source="callback",
                    body='{"status": "success"}',
                    outcome="applied",
                )
            )


def add_attempts(services: Services, days_ago: float, count: int) -> str:
    """Insert one delivery with ``count`` attempts that got a response body."""
    delivery_id = new_id("dlv")
    with services.db.transaction() as session:
        event = Event(id=new_id("evt"), type="job.completed", job_id=None, payload={})
        session.add(event)
        session.flush()
        session.add(
            Delivery(
                id=delivery_id,
                event_id=event.id,
                kind="webhook",
                target_url="https://example.com/hook",
                status="failed",
            )
        )
        session.flush()
        for _ in range(count):
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery_id,
                    attempted_at=ago(days_ago),
                    status_code=500,
                    latency_ms=12.0,
                    error="HTTP 500",
                    response_excerpt="<html>receiver secrets</html>",
                    outcome="retry",
                )
            )
    return delivery_id


def callback_count(services: Services) -> int:
    with services.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(CallbackRecord)) or 0)


def excerpts(services: Services, delivery_id: str) -> list[str | None]:
    with services.db.transaction() as session:
        query = select(DeliveryAttempt.response_excerpt).where(
            DeliveryAttempt.delivery_id == delivery_id
        )
        return list(session.scalars(query))


def job_row(services: Services, job_id: str) -> Job:
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def run(services: Services, **options: Any) -> PruneReport:
    options.setdefault("older_than", MONTH)
    options.setdefault("include_media", False)
    return prune(services.db, services.storage, **options)


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1.5D", timedelta(hours=36)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text, unit_required=True, positive=True) == expected.total_seconds()


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "0d", "30 days", "1y", "1e3d"])
def test_parse_duration_refuses_what_is_not_a_positive_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text, unit_required=True, positive=True)


# -- callbacks and delivery bodies ---------------------------------------------------------------


def test_old_callbacks_are_deleted_in_batches_and_recent_ones_kept(services: Services) -> None:
    add_callbacks(services, days_ago=40, count=7)
    add_callbacks(services, days_ago=2, count=3)
    report = run(services, batch_size=3)
    assert report.callbacks_deleted == 7
    assert callback_count(services) == 3


def test_old_attempt_bodies_are_cleared_but_the_attempts_stay(services: Services) -> None:
    old = add_attempts(services, days_ago=40, count=5)
    recent = add_attempts(services, days_ago=1, count=2)
    report = run(services, batch_size=2)
    assert report.attempt_bodies_cleared == 5
    assert excerpts(services, old) == [None] * 5
    assert excerpts(services, recent) == ["<html>receiver secrets</html>"] * 2


def test_a_second_run_finds_nothing_left(services: Services) -> None:
    add_callbacks(services, days_ago=40, count=2)
    add_attempts(services, days_ago=40, count=2)
    add_job(services, finished_days_ago=40)
    run(services, include_media=True)
    again = run(services, include_media=True)
    assert (again.callbacks_deleted, again.attempt_bodies_cleared) == (0, 0)
    assert (again.media_jobs_pruned, again.media_objects_deleted) == (0, 0)


# -- media -------------------------------------------------------------------------------------


def test_media_is_kept_without_the_media_option(services: Services) -> None:
    job_id = add_job(services, finished_days_ago=40)
    report = run(services)
    assert report.media_objects_deleted == 0
    assert services.storage.stat(f"outputs/{job_id}/0.mp4") is not None


def test_old_outputs_are_deleted_and_the_job_shows_them_unstored(
    services: Services, client: FlaskClient, auth: dict[str, str]
) -> None:
    old = add_job(services, finished_days_ago=40, outputs=2)
    report = run(services, include_media=True, batch_size=1)
    assert (report.media_jobs_pruned, report.media_objects_deleted) == (1, 2)
    assert services.storage.stat(f"outputs/{old}/0.mp4") is None
    assert services.storage.stat(f"outputs/{old}/1.mp4") is None
    outputs = client.get(f"/v1/jobs/{old}", headers=auth).get_json()["outputs"]
    assert [(o["stored"], o["url"]) for o in outputs] == [(False, None), (False, None)]
    # What was known about the video stays: where it came from and what it was.
    assert outputs[0]["source_url"] == "https://cdn.example/0.mp4"
    assert outputs[0]["content_type"] == "video/mp4"


def test_recent_and_unfinished_jobs_keep_their_media(services: Services) -> None:
    recent = add_job(services, finished_days_ago=3)
    running = add_job(
        services, finished_days_ago=None, status=JobStatus.PROCESSING, upload=True, outputs=0
    )
    report = run(services, include_media=True)
    assert report.media_jobs_pruned == 0
    assert services.storage.stat(f"outputs/{recent}/0.mp4") is not None
    assert job_row(services, running).input["image_key"] == f"inputs/{running}.png"
    assert services.storage.stat(f"inputs/{running}.png") is not None


def test_uploaded_input_of_an_old_failed_job_is_deleted(
    services: Services, client: FlaskClient, auth: dict[str, str]
) -> None:
    job_id = add_job(
        services, finished_days_ago=40, status=JobStatus.FAILED, outputs=0, upload=True
    )
    report = run(services, include_media=True)
    assert (report.media_jobs_pruned, report.media_objects_deleted) == (1, 1)
    assert services.storage.stat(f"inputs/{job_id}.png") is None
    assert "image_key" not in job_row(services, job_id).input
    resource = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert "init_image" not in resource["input"]


def test_many_old_jobs_are_pruned_across_batches(services: Services) -> None:
    ids = [add_job(services, finished_days_ago=40 + i) for i in range(5)]
    report = run(services, include_media=True, batch_size=2)
    assert report.media_jobs_pruned == 5
    assert all(services.storage.stat(f"outputs/{job_id}/0.mp4") is None for job_id in ids)


class RefusingStorage:
    """Storage whose deletes fail, as a bucket without delete permission would."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def put(self, key: str, data: BinaryIO, *, content_type: str) -> StoredObject:
        return self.inner.put(key, data, content_type=content_type)

    def stat(self, key: str) -> StoredObject | None:
        return self.inner.stat(key)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        return self.inner.read_range(key, start, end_inclusive)

    def delete(self, key: str) -> None:
        raise PermissionError(f"AccessDenied: {key}")

    def direct_url(self, key: str, ttl: float) -> str | None:
        return self.inner.direct_url(key, ttl)


def test_a_job_whose_media_cannot_be_deleted_keeps_its_keys(services: Services) -> None:
    job_id = add_job(services, finished_days_ago=40)
    report = prune(
        services.db,
        RefusingStorage(services.storage),
        older_than=MONTH,
        include_media=True,
    )
    assert (report.media_failures, report.media_jobs_pruned) == (1, 0)
    assert job_row(services, job_id).outputs[0]["key"] == f"outputs/{job_id}/0.mp4"


def test_dry_run_counts_and_changes_nothing(services: Services) -> None:
    add_callbacks(services, days_ago=40, count=4)
    delivery = add_attempts(services, days_ago=40, count=3)
    job_id = add_job(services, finished_days_ago=40, outputs=2, upload=True)
    report = run(services, include_media=True, dry_run=True, batch_size=1)
    assert report.as_dict() | {"cutoff": None} == {
        "cutoff": None,
        "dry_run": True,
        "callbacks_deleted": 4,
        "attempt_bodies_cleared": 3,
        "media_jobs_pruned": 1,
        "media_objects_deleted": 3,
        "media_failures": 0,
    }
    assert callback_count(services) == 4
    assert None not in excerpts(services, delivery)
    assert services.storage.stat(f"outputs/{job_id}/1.mp4") is not None
    assert job_row(services, job_id).outputs[0]["key"] == f"outputs/{job_id}/0.mp4"


@pytest.mark.parametrize(
    "options", [{"older_than": timedelta(0)}, {"batch_size": 0}], ids=["zero-age", "zero-batch"]
)
def test_prune_refuses_nonsense_options(services: Services, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        run(services, **options)


# -- the command -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point ``motionhook`` at the test app's database and storage."""
    settings = services.settings
    monkeypatch.setenv("MOTIONHOOK_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MOTIONHOOK_STORAGE_URL", settings.storage_url)
    monkeypatch.setenv("MOTIONHOOK_API_TOKENS", "cli-token")
    monkeypatch.setenv("MOTIONHOOK_CALLBACK_SECRET", settings.callback_secret)


@pytest.mark.usefixtures("cli_env")
def test_command_prunes_with_media(services: Services) -> None:
    add_callbacks(services, days_ago=40, count=2)
    job_id = add_job(services, finished_days_ago=40)
    result = CliRunner().invoke(main, ["prune", "--older-than", "30d", "--media"])
    assert result.exit_code == 0, result.output
    assert "deleted" in result.output
    assert "2 raw callbacks" in result.output
    assert "1 media objects of 1 jobs" in result.output
    assert callback_count(services) == 0
    assert services.storage.stat(f"outputs/{job_id}/0.mp4") is None


@pytest.mark.usefixtures("cli_env")
def test_command_dry_run_says_what_would_go(services: Services) -> None:
    add_callbacks(services, days_ago=40, count=2)
    result = CliRunner().invoke(
        main, ["prune", "--older-than", "12h", "--dry-run", "--batch-size", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "would delete" in result.output
    assert callback_count(services) == 2


@pytest.mark.usefixtures("cli_env")
def test_command_refuses_a_bad_duration() -> None:
    result = CliRunner().invoke(main, ["prune", "--older-than", "30"])
    assert result.exit_code == 2
    assert "30d" in result.output
