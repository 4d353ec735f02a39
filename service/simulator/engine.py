"""The simulated ModelsLab backend: jobs, fault knobs, rendering and callbacks.

Nothing here knows about Flask: the views hand in the decoded JSON body and the
request's base URL, and get back a ``Reply`` (JSON body and HTTP status).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
import random
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import requests
from marshmallow import Schema, ValidationError
from requests.adapters import HTTPAdapter

from .knobs import SimulatorKnobs
from .render import RenderError, probe_image, render_video
from .wire import FETCH_REQUEST, IMG2VIDEO_REQUEST, describe_validation_error, effective_model_id

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}
USER_AGENT = "motionhook-modelslab-simulator/1.0"
#: (connect, read) timeouts when downloading ``init_image``.
IMAGE_TIMEOUT = (3.05, 15.0)
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: Callback POSTs are retried on connection errors only, like a best-effort sender.
CALLBACK_ATTEMPTS = 3
CALLBACK_RETRY_BACKOFF = 0.25
RECENT_CALLBACKS = 100
#: Oldest jobs are forgotten beyond this many, so a long benchmark cannot eat all memory.
MAX_JOBS = 10_000
RENDER_CACHE_SIZE = 32
PROCESSING_MESSAGE = "Try to fetch request after given estimated time"
RATE_LIMIT_MESSAGE = "Rate limit exceeded. Maximum 5 queued requests allowed."
NO_KEY = "none"


def key_fingerprint(key: object) -> str:
    """Name the account a request's ``key`` speaks for, without showing the key."""
    if not isinstance(key, str) or not key:
        return NO_KEY
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Reply(NamedTuple):
    """A JSON answer of the simulated API."""

    body: dict[str, Any]
    http_status: int = 200


@dataclass(frozen=True)
class Output:
    """A rendered video, ready to be served."""

    data: bytes
    content_type: str


class UpstreamError(Exception):
    """An answer in ModelsLab's error shape: ``{"status": "error", "message": ...}``."""

    def __init__(self, http_status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.extra = extra

    def reply(self) -> Reply:
        return Reply({"status": "error", "message": self.message, **self.extra}, self.http_status)


@dataclass
class Job:
    """One img2video generation and everything needed to answer about it."""

    id: int
    meta: dict[str, Any]
    output_type: str
    base_url: str
    knobs: SimulatorKnobs
    submitted_at: float  # time.monotonic()
    cancelled: threading.Event
    image: bytes | None = None
    status: str = "processing"
    video: bytes | None = None
    failure: str | None = None
    generation_time: float | None = None
    output_requests: int = 0
    # The account (key_fingerprint of its key) whose queued-request cap the job takes.
    account: str = NO_KEY

    @property
    def output_url(self) -> str:
        return f"{self.base_url}/outputs/{self.id}.{self.output_type}"

    @property
    def fetch_url(self) -> str:
        return f"{self.base_url}/api/v6/video/fetch/{self.id}"

    @property
    def webhook(self) -> str | None:
        webhook: str | None = self.meta.get("webhook")
        return webhook

    @property
    def track_id(self) -> str | None:
        track_id: str | None = self.meta.get("track_id")
        return track_id


def processing_body(job: Job, *, eta: int, for_fetch: bool) -> dict[str, Any]:
    """Answer for a job still running; fetch answers ``output: ""`` like ModelsLab."""
    return {
        "status": "processing",
        "tip": f"Your request is processing in the background; fetch it at {job.fetch_url}",
        "eta": eta,
        "message": PROCESSING_MESSAGE,
        "fetch_result": job.fetch_url,
        "id": job.id,
        "output": "" if for_fetch else [],
        "meta": job.meta,
        "future_links": [job.output_url],
    }


def success_body(job: Job) -> dict[str, Any]:
    """Answer for a finished job (immediate answer and fetch)."""
    return {
        "status": "success",
        "generationTime": job.generation_time,
        "id": job.id,
        "output": [job.output_url],
        "proxy_links": [job.output_url],
        "meta": job.meta,
    }


def failed_body(job: Job) -> dict[str, Any]:
    """Answer for a job whose generation failed (fetch)."""
    return {
        "status": "failed",
        "id": job.id,
        "message": job.failure,
        "output": [],
        "meta": job.meta,
    }


def callback_body(job: Job) -> dict[str, Any]:
    """The JSON ModelsLab POSTs to ``webhook`` when the job ends."""
    if job.status == "success":
        return {**success_body(job), "track_id": job.track_id}
    return {
        "status": "failed",
        "id": job.id,
        "message": job.failure,
        "track_id": job.track_id,
        "meta": job.meta,
    }


def _by_operation() -> dict[str, Counter[str]]:
    return {"submit": Counter(), "fetch": Counter()}


@dataclass
class _Account:
    """What one account (one key) asked for and holds: ModelsLab's cap is per account."""

    submits: int = 0
    fetches: int = 0
    # Generations submitted and not finished, now and at the most (ModelsLab's "queued").
    outstanding: int = 0
    max_outstanding: int = 0
    http_statuses: dict[str, Counter[str]] = field(default_factory=_by_operation)

    def as_dict(self) -> dict[str, Any]:
        return {
            "submits": self.submits,
            "fetches": self.fetches,
            "outstanding": self.outstanding,
            "max_outstanding": self.max_outstanding,
            "http_statuses": {kind: dict(counts) for kind, counts in self.http_statuses.items()},
        }


@dataclass
class _Stats(_Account):
    """The same counts over every account, and what is not per account."""

    callbacks_sent: int = 0
    callbacks_failed: int = 0
    output_downloads: int = 0
    output_404s: int = 0
    answered: dict[str, Counter[str]] = field(default_factory=_by_operation)
    # By key_fingerprint of the key each request carried.
    accounts: defaultdict[str, _Account] = field(default_factory=lambda: defaultdict(_Account))
    recent_callbacks: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=RECENT_CALLBACKS)
    )


class Simulator:
    """A thread-safe, in-memory stand-in for ModelsLab's img2video service."""

    def __init__(
        self,
        knobs: SimulatorKnobs | None = None,
        *,
        api_keys: Iterable[str] = (),
        public_url: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.api_keys = tuple(api_keys)
        self.public_url = public_url.rstrip("/") if public_url else None
        self._initial_knobs = dataclasses.replace(knobs) if knobs else SimulatorKnobs()
        self._knobs = dataclasses.replace(self._initial_knobs)
        self._session = session or _make_session()
        self._lock = threading.Lock()
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._next_id = 1
        self._stats = _Stats()
        self._cancel = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._render_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
        self._render_cache: OrderedDict[tuple[object, ...], bytes] = OrderedDict()

    # -- knobs and control ---------------------------------------------------------------

    @property
    def knobs(self) -> SimulatorKnobs:
        """A copy of the knobs in force."""
        with self._lock:
            return dataclasses.replace(self._knobs)

    def update_knobs(self, changes: Mapping[str, Any]) -> SimulatorKnobs:
        """Validate and apply a partial update (raises ``ValidationError``); return all knobs."""
        with self._lock:
            self._knobs = self._knobs.updated(changes)
            return dataclasses.replace(self._knobs)

    def stats(self) -> dict[str, Any]:
        """Counters and the most recent callbacks, JSON-ready."""
        with self._lock:
            stats = self._stats
            return {
                **stats.as_dict(),
                "callbacks_sent": stats.callbacks_sent,
                "callbacks_failed": stats.callbacks_failed,
                "output_downloads": stats.output_downloads,
                "output_404s": stats.output_404s,
                "answered": {kind: dict(counts) for kind, counts in stats.answered.items()},
                "accounts": {name: account.as_dict() for name, account in stats.accounts.items()},
                "jobs": dict(Counter(job.status for job in self._jobs.values())),
                "recent_callbacks": list(stats.recent_callbacks),
            }

    def reset(self, *, knobs: bool = False) -> None:
        """Forget jobs and stats and cancel pending work; ids keep increasing."""
        with self._lock:
            self._cancel.set()
            self._cancel = threading.Event()
            self._jobs.clear()
            self._stats = _Stats()
            if knobs:
                self._knobs = dataclasses.replace(self._initial_knobs)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no job is rendering, waiting or calling back; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                with self._lock:
                    return not self._threads

    def close(self, timeout: float = 5.0) -> None:
        """Cancel pending jobs, wait for their threads and close the HTTP session."""
        with self._lock:
            self._cancel.set()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._session.close()

    # -- the API -------------------------------------------------------------------------

    def submit(self, body: object, *, base_url: str) -> Reply:
        """Handle ``POST /api/v6/video/img2video`` with the decoded JSON ``body``."""
        account = _account_of(body)
        try:
            reply = self._submit(body, base_url, account)
        except UpstreamError as exc:
            reply = exc.reply()
        self._record_answer("submit", reply, account)
        return reply

    def fetch(self, job_id: int, body: object) -> Reply:
        """Handle ``POST /api/v6/video/fetch/<job_id>``."""
        try:
            self._load(body, FETCH_REQUEST)
            reply = self._fetch(job_id)
        except UpstreamError as exc:
            reply = exc.reply()
        self._record_answer("fetch", reply, _account_of(body))
        return reply

    def output(self, job_id: int, output_type: str) -> Output | None:
        """Return the rendered video, or None while it is not (yet) available."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.output_type != output_type:
                self._stats.output_404s += 1
                return None
            job.output_requests += 1
            if job.output_requests <= job.knobs.future_link_404s or job.video is None:
                self._stats.output_404s += 1
                return None
            self._stats.output_downloads += 1
            return Output(job.video, CONTENT_TYPES[job.output_type])

    # -- submit --------------------------------------------------------------------------

    def _submit(self, body: object, base_url: str, account: str) -> Reply:
        params = self._load(body, IMG2VIDEO_REQUEST)
        self._inject_fault(account)  # on success, one queued slot is reserved for this submit
        try:
            image = self._download_image(params["init_image"])
            job = self._create_job(params, image, base_url, account)
        except BaseException:
            self._release_slot(account)
            raise
        knobs = job.knobs
        logger.info(
            "simulator accepted job %s", job.id, extra={"job_id": job.id, "track_id": job.track_id}
        )
        if not (knobs.immediate_success or knobs.callback_before_response):
            self._spawn(self._run_job, job)
            return Reply(processing_body(job, eta=knobs.eta, for_fetch=False))
        self._generate(job)
        self._complete(job)
        if knobs.callback_before_response:
            self._send_callbacks(job)
        elif knobs.callback_on_immediate:
            self._spawn(self._callback_after_delay, job)
        if not knobs.immediate_success:
            return Reply(processing_body(job, eta=knobs.eta, for_fetch=False))
        if job.status == "success":
            return Reply(success_body(job))
        return Reply({"status": "error", "id": job.id, "message": job.failure})

    def _load(self, body: object, schema: Schema) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise UpstreamError(400, "The request body must be a JSON object")
        if self.api_keys:
            key = body.get("key")
            given = key.encode() if isinstance(key, str) else b""
            # Every key compared, so the time taken does not tell which one came close.
            matches = [hmac.compare_digest(given, known.encode()) for known in self.api_keys]
            if not any(matches):
                raise UpstreamError(401, "Invalid API key")
        try:
            params: dict[str, Any] = schema.load(body)
        except ValidationError as exc:
            raise UpstreamError(400, describe_validation_error(exc)) from exc
        return params

    def _inject_fault(self, account: str) -> None:
        with self._lock:
            held = self._stats.accounts[account]
            knobs = self._knobs
            if knobs.server_error_next:
                knobs.server_error_next -= 1
                raise UpstreamError(500, "Internal server error (simulated)")
            if knobs.rate_limit_next:
                knobs.rate_limit_next -= 1
                raise UpstreamError(
                    429, RATE_LIMIT_MESSAGE, retry_after=knobs.rate_limit_retry_after
                )
            if knobs.max_queued and held.outstanding + knobs.held_slots >= knobs.max_queued:
                raise UpstreamError(
                    429,
                    f"Rate limit exceeded. Maximum {knobs.max_queued} queued requests allowed.",
                    retry_after=knobs.rate_limit_retry_after,
                )
            if knobs.error_next:
                knobs.error_next -= 1
                raise UpstreamError(200, "Failed to queue the request (simulated upstream error)")
            for counts in (self._stats, held):
                counts.outstanding += 1
                counts.max_outstanding = max(counts.max_outstanding, counts.outstanding)

    def _release_slot(self, account: str) -> None:
        with self._lock:
            for counts in (self._stats, self._stats.accounts[account]):
                counts.outstanding = max(0, counts.outstanding - 1)

    def _download_image(self, url: str) -> bytes:
        """Fetch ``init_image`` the way ModelsLab does: no redirects, errors as HTTP 200."""
        try:
            response = self._session.get(
                url, timeout=IMAGE_TIMEOUT, allow_redirects=False, stream=True
            )
        except requests.RequestException as exc:
            raise UpstreamError(
                200, f"Could not download init_image: {type(exc).__name__}"
            ) from exc
        with response:
            if response.is_redirect or 300 <= response.status_code < 400:
                raise UpstreamError(
                    200,
                    "init_image must be reachable without redirects "
                    f"(it answered HTTP {response.status_code})",
                )
            if response.status_code != 200:
                raise UpstreamError(
                    200, f"Could not download init_image: it answered HTTP {response.status_code}"
                )
            image = _read_capped(response, MAX_IMAGE_BYTES)
        if image is None:
            raise UpstreamError(200, f"init_image is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            probe_image(image)
        except RenderError as exc:
            raise UpstreamError(200, f"init_image is not a valid image: {exc}") from exc
        return image

    def _create_job(
        self, params: dict[str, Any], image: bytes, request_base: str, account: str
    ) -> Job:
        meta = {name: value for name, value in params.items() if name != "key"}
        meta["model_id"] = effective_model_id(params["model_id"])
        if meta["seed"] is None:
            meta["seed"] = random.randrange(2**32)
        with self._lock:
            knobs = dataclasses.replace(self._knobs)
            job = Job(
                id=self._next_id,
                meta=meta,
                output_type=knobs.output_type_override or params["output_type"],
                base_url=self.public_url or request_base.rstrip("/"),
                knobs=knobs,
                submitted_at=time.monotonic(),
                cancelled=self._cancel,
                image=image,
                account=account,
            )
            self._next_id += 1
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        return job

    # -- fetch ---------------------------------------------------------------------------

    def _fetch(self, job_id: int) -> Reply:
        with self._lock:  # a job completes under the lock: read a consistent snapshot
            job = self._jobs.get(job_id)
            if job is None:
                raise UpstreamError(200, f"Request {job_id} not found")
            if job.status == "success":
                return Reply(success_body(job))
            if job.status == "failed":
                return Reply(failed_body(job))
            elapsed = time.monotonic() - job.submitted_at
            eta = max(1, math.ceil(job.knobs.eta - elapsed))
            return Reply(processing_body(job, eta=eta, for_fetch=True))

    # -- generation and callbacks --------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        """Background life of a job: render, wait out the delay, complete, call back."""
        self._generate(job)
        remaining = job.submitted_at + job.knobs.delay - time.monotonic()
        if job.cancelled.wait(max(0.0, remaining)):
            return
        self._complete(job)
        self._send_callbacks(job)

    def _callback_after_delay(self, job: Job) -> None:
        remaining = job.submitted_at + job.knobs.delay - time.monotonic()
        if not job.cancelled.wait(max(0.0, remaining)):
            self._send_callbacks(job)

    def _generate(self, job: Job) -> None:
        """Render the video (servable at once, like a future link) or note the failure."""
        image, job.image = job.image, None
        if job.knobs.fail_generation:
            job.failure = "Video generation failed (simulated fail_generation)"
            return
        assert image is not None
        meta = job.meta
        key = (
            hashlib.sha256(image).digest(),
            meta["width"],
            meta["height"],
            meta["num_frames"],
            meta["fps"],
            job.output_type,
        )
        with self._lock:
            video = self._render_cache.get(key)
        if video is None:
            try:
                with self._render_slots:
                    video = render_video(
                        image,
                        width=meta["width"],
                        height=meta["height"],
                        num_frames=meta["num_frames"],
                        fps=meta["fps"],
                        output_type=job.output_type,
                    )
            except RenderError as exc:
                job.failure = f"Video generation failed: {exc}"
                logger.warning("simulator render failed for job %s: %s", job.id, exc)
                return
            with self._lock:
                self._render_cache[key] = video
                while len(self._render_cache) > RENDER_CACHE_SIZE:
                    self._render_cache.popitem(last=False)
        with self._lock:
            job.video = video

    def _complete(self, job: Job) -> None:
        with self._lock:
            job.status = "failed" if job.failure else "success"
            job.generation_time = round(time.monotonic() - job.submitted_at, 3)
            if not job.cancelled.is_set():  # a reset has zeroed the counts already
                for counts in (self._stats, self._stats.accounts[job.account]):
                    counts.outstanding = max(0, counts.outstanding - 1)

    def _send_callbacks(self, job: Job) -> None:
        if job.knobs.drop_callback or not job.webhook:
            return
        body = callback_body(job)
        for copy in range(1 + job.knobs.duplicate_callbacks):
            if job.cancelled.is_set():
                return
            self._post_callback(job, job.webhook, body, copy)

    def _post_callback(self, job: Job, url: str, body: dict[str, Any], copy: int) -> None:
        sent_at = datetime.now(UTC).isoformat()
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        attempts = 0
        while attempts < CALLBACK_ATTEMPTS:
            attempts += 1
            try:
                with self._session.post(
                    url, json=body, timeout=job.knobs.callback_timeout, allow_redirects=False
                ) as response:
                    status_code, error = response.status_code, None
                break
            except requests.ConnectionError as exc:
                error = f"{type(exc).__name__}: {exc}"
                retrying = attempts < CALLBACK_ATTEMPTS
                if not retrying or job.cancelled.wait(CALLBACK_RETRY_BACKOFF * attempts):
                    break
            except requests.RequestException as exc:  # a read timeout may have been processed
                error = f"{type(exc).__name__}: {exc}"
                break
        delivered = status_code is not None and 200 <= status_code < 300
        record = {
            "job_id": job.id,
            "track_id": job.track_id,
            "copy": copy,
            "url": url,
            "body": body,
            "sent_at": sent_at,
            "duration": round(time.monotonic() - started, 3),
            "attempts": attempts,
            "status_code": status_code,
            "error": error,
        }
        log = logger.info if delivered else logger.warning
        log(
            "simulator callback for job %s -> %s: %s",
            job.id,
            url,
            status_code if status_code is not None else error,
            extra={"job_id": job.id, "track_id": job.track_id},
        )
        with self._lock:
            if job.cancelled.is_set():  # reset meanwhile: keep the fresh stats clean
                return
            self._stats.callbacks_sent += 1
            if not delivered:
                self._stats.callbacks_failed += 1
            self._stats.recent_callbacks.append(record)

    # -- plumbing ------------------------------------------------------------------------

    def _spawn(self, target: Callable[[Job], None], job: Job) -> None:
        def run() -> None:
            try:
                target(job)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=f"simulator-job-{job.id}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _record_answer(self, kind: str, reply: Reply, account: str) -> None:
        with self._lock:
            for counts in (self._stats, self._stats.accounts[account]):
                if kind == "submit":
                    counts.submits += 1
                else:
                    counts.fetches += 1
                counts.http_statuses[kind][str(reply.http_status)] += 1
            self._stats.answered[kind][str(reply.body.get("status"))] += 1


def _account_of(body: object) -> str:
    return key_fingerprint(body.get("key") if isinstance(body, dict) else None)


def _make_session() -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


def _read_capped(response: requests.Response, limit: int) -> bytes | None:
    """Read the body, or return None as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
