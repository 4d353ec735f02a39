"""``/v1/jobs``: submit a job, read one, list them."""

from __future__ import annotations

import hashlib
from typing import Any

from flask import request
from flask_smorest import Blueprint
from marshmallow import ValidationError
from sqlalchemy.exc import IntegrityError

from schemas import strict_json
from schemas.jobs import JobCreateSchema, JobListArgs, JobPageSchema, JobSchema
from service.api.auth import client_project, owned, require_client
from service.api.docs import IDEMPOTENCY_KEY, JOB_EXAMPLE
from service.api.errors import abort
from service.extension import services
from service.jobs import (
    create_job,
    find_idempotent_job,
    job_resource,
    list_jobs,
    request_fingerprint,
    scoped_idempotency_key,
)
from service.models import Job, new_id
from service.outbound import TargetRefused, validate_target_url

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Image-to-video jobs")
blp.before_request(require_client)

JOB_CREATE = JobCreateSchema()
JSON_FIELDS_IN_FORMS = ("metadata", "webhook_events")
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": "JobCreate", "example": JOB_EXAMPLE},
        "multipart/form-data": {"schema": "JobCreateForm"},
    },
}


def _invalid(field: str, message: str) -> None:
    abort(422, message=f"{field}: {message}", errors={"json": {field: [message]}})


def _read_body() -> tuple[dict[str, Any], bytes | None]:
    """Return the raw parameters and the uploaded image bytes, if any."""
    if request.mimetype == "multipart/form-data":
        # werkzeug names a part None when its Content-Disposition name is malformed.
        if None in request.form or None in request.files:
            abort(400, message="multipart body has a part without a valid name")
        form: dict[str, Any] = request.form.to_dict()
        for name in JSON_FIELDS_IN_FORMS:
            if name in form:
                try:
                    form[name] = strict_json.loads(form[name])
                except strict_json.JSONRejected as exc:
                    _invalid(name, exc.message)
                except ValueError:
                    _invalid(name, "must be JSON in a multipart form")
        upload = request.files.get("image")
        extra_files = set(request.files) - {"image"}
        if extra_files:
            _invalid(sorted(extra_files)[0], "Unknown field.")
        return form, (upload.read() if upload else None)
    if request.mimetype != "application/json":
        abort(415, message="body must be JSON (application/json) or multipart/form-data")
    data = request.get_json(silent=True)
    if data is None:
        abort(400, message="body is not valid JSON")
    if not isinstance(data, dict):
        abort(422, message="body must be a JSON object")
    return data, None


def _load_params() -> tuple[dict[str, Any], bytes | None]:
    raw, upload = _read_body()
    try:
        params: dict[str, Any] = JOB_CREATE.load(raw)
    except ValidationError as exc:
        abort(422, errors={"json": exc.messages})
    if upload is not None and params.get("init_image"):
        _invalid("init_image", "send either init_image or an image upload, not both")
    if upload is None and not params.get("init_image"):
        _invalid("init_image", "required (an http(s) URL), unless an image file is uploaded")
    if params.get("webhook_url"):
        try:
            validate_target_url(
                params["webhook_url"], allow_private=services().settings.allow_private_targets
            )
        except TargetRefused as exc:
            _invalid("webhook_url", str(exc))
    return params, upload


@blp.post("")
@blp.doc(requestBody=REQUEST_BODY, parameters=[IDEMPOTENCY_KEY], security=[{"bearer": []}])
@blp.response(202, JobSchema)
@blp.alt_response(200, schema=JobSchema, description="Replay of an Idempotency-Key")
@blp.alt_response(409, description="Idempotency-Key reused with another body")
@blp.alt_response(422, description="Invalid input; the message names each field")
def create(**_: Any) -> tuple[dict[str, Any], int]:
    """Queue an image-to-video job; the worker submits it to ModelsLab at once."""
    from service.downloads import store_upload

    svc = services()
    params, upload = _load_params()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        abort(422, message="Idempotency-Key: must be 1 to 255 characters")
    upload_hash = hashlib.sha256(upload).hexdigest() if upload is not None else None
    fingerprint = request_fingerprint(params, upload_hash)
    project_id = client_project()
    scoped = scoped_idempotency_key(project_id, key) if key else None
    if scoped:
        replay = _replay(scoped, fingerprint)
        if replay is not None:
            return replay, 200
    job_id = new_id("job")
    if upload is not None:
        try:
            stored = store_upload(svc.storage, job_id, upload, svc.settings.max_upload_bytes)
        except ValueError as exc:
            abort(422, message=str(exc), errors={"files": {"image": [str(exc)]}})
        params["image_key"] = stored.key
    try:
        with svc.db.transaction() as session:
            job = create_job(
                session,
                svc.db,
                params,
                project_id=project_id,
                job_id=job_id,
                idempotency_key=scoped,
                fingerprint=fingerprint,
            )
            resource = job_resource(job, svc.media_url)
    except IntegrityError:
        # Two requests raced with the same Idempotency-Key; the other one won.
        replay = _replay(scoped, fingerprint) if scoped else None
        if replay is None:
            raise
        return replay, 200
    return resource, 202


def _replay(scoped_key: str, fingerprint: str) -> dict[str, Any] | None:
    svc = services()
    with svc.db.transaction() as session:
        job = find_idempotent_job(session, scoped_key)
        if job is None:
            return None
        if job.request_fingerprint != fingerprint:
            abort(409, message="Idempotency-Key was already used with a different request body")
        return job_resource(job, svc.media_url)


@blp.get("/<string:job_id>")
@blp.doc(security=[{"bearer": []}])
@blp.response(200, JobSchema)
@blp.alt_response(404, description="No such job")
def get_job(job_id: str) -> dict[str, Any]:
    """Return one job."""
    svc = services()
    with svc.db.transaction() as session:
        return job_resource(owned(session, Job, job_id, "job"), svc.media_url)


@blp.get("")
@blp.doc(security=[{"bearer": []}])
@blp.arguments(JobListArgs, location="query")
@blp.response(200, JobPageSchema)
def list_all(args: dict[str, Any]) -> dict[str, Any]:
    """List jobs, newest first, one page at a time."""
    svc = services()
    with svc.db.transaction() as session:
        try:
            jobs, next_cursor = list_jobs(
                session,
                client_project(),
                status=args.get("status"),
                limit=args["limit"],
                cursor=args.get("cursor"),
            )
        except ValueError as exc:
            abort(422, message=f"cursor: {exc}", errors={"query": {"cursor": [str(exc)]}})
        return {
            "items": [job_resource(job, svc.media_url) for job in jobs],
            "next_cursor": next_cursor,
        }
