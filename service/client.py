"""``motionhook submit`` and ``motionhook listen``: the HTTP API from a terminal.

Both talk to ``MOTIONHOOK_URL`` (default: the local dev instance) with the token
``MOTIONHOOK_TOKEN`` (default: the dev token file, ``instance/api_token``). They
follow the SSE streams and reconnect with ``Last-Event-ID``, so nothing is
missed when a connection drops. People get a live progress bar (rich, on
stderr); scripts get the job as JSON on stdout and an exit status of 0 only
when the job completed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import sseclient
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from service.config import instance_path
from service.eventlog import TERMINAL_TYPES
from service.notifiers.webhook import generate_secret, render

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = 30.0
# A stream sends a comment every 15 s: silence for longer means a dead connection.
STREAM_READ_TIMEOUT = 45.0
RECONNECT_DELAY = 1.0
DOWNLOAD_CHUNK = 64 * 1024
# Progress shown while ModelsLab works, at most; the last step is the download.
PROCESSING_SHARE = 0.95


class ClientError(Exception):
    """The API refused a request or cannot be reached; the message says what to do."""


@dataclass
class Client:
    """One motionhook instance and its token."""

    base_url: str
    token: str = field(repr=False)
    http: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Client:
        """``MOTIONHOOK_URL`` and ``MOTIONHOOK_TOKEN``, else the dev instance and its token."""
        env = dict(os.environ if environ is None else environ)
        token = env.get("MOTIONHOOK_TOKEN", "").strip()
        if not token:
            token_file = instance_path() / "api_token"
            try:
                token = token_file.read_text().strip()
            except OSError:
                raise ClientError(
                    f"no token: set MOTIONHOOK_TOKEN, or run `make run` here so that "
                    f"{token_file} exists"
                ) from None
        return cls(env.get("MOTIONHOOK_URL") or DEFAULT_URL, token)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self.http.request(method, url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach motionhook at {self.base_url}: {exc}") from exc
        _raise_for_status(response, f"{method} {path}")
        return response

    def submit(self, image_or_url: str, params: dict[str, Any]) -> dict[str, Any]:
        """Create a job from an http(s) URL or a local image file."""
        if image_or_url.startswith(("http://", "https://")):
            response = self._request(
                "POST", "/v1/jobs", json={"init_image": image_or_url, **params}
            )
        else:
            path = Path(image_or_url)
            if not path.is_file():
                raise ClientError(f"{image_or_url}: no such file (or give an http(s) URL)")
            with path.open("rb") as image:
                form = {name: str(value) for name, value in params.items()}
                response = self._request(
                    "POST", "/v1/jobs", files={"image": (path.name, image)}, data=form
                )
        job: dict[str, Any] = response.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        resource: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}").json()
        return resource

    def events(
        self, path: str, *, last_event_id: str | None = None, until_end: bool = False
    ) -> Iterator[sseclient.Event]:
        """Follow a stream, reconnecting with Last-Event-ID; ``until_end``: stop when it ends."""
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                response = self.http.get(
                    f"{self.base_url}{path}",
                    headers=headers,
                    stream=True,
                    timeout=(TIMEOUT, STREAM_READ_TIMEOUT),
                )
                if response.status_code == 503:  # every stream slot taken: wait and retry
                    response.close()
                    time.sleep(float(response.headers.get("Retry-After", RECONNECT_DELAY)))
                    continue
                _raise_for_status(response, f"GET {path}")
                with response:
                    chunks = response.iter_content(chunk_size=None)
                    for event in sseclient.SSEClient(chunks).events():
                        last_event_id = event.id or last_event_id
                        yield event
                if until_end:
                    return
            except requests.RequestException:
                pass  # dropped: reconnect below, resuming after the last event
            time.sleep(RECONNECT_DELAY)

    def download(self, url: str, destination: Path, on_bytes: Callable[[int], None]) -> int:
        """Save the durable output URL to ``destination``; return the byte count."""
        try:
            response = self.http.get(url, stream=True, timeout=TIMEOUT)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise ClientError(f"cannot download the video: {exc}") from exc
        written = 0
        partial = destination.with_name(destination.name + ".part")
        with response, partial.open("wb") as handle:
            for chunk in response.iter_content(DOWNLOAD_CHUNK):
                handle.write(chunk)
                written += len(chunk)
                on_bytes(len(chunk))
        partial.replace(destination)
        return written


def _raise_for_status(response: requests.Response, what: str) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    raise ClientError(f"{what}: HTTP {response.status_code}: {message}")


def wait_for_job(client: Client, job: dict[str, Any], console: Console) -> dict[str, Any]:
    """Show the job's progress live until it completes or fails; return the final job."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(job["status"], total=1.0)
        started = time.monotonic()
        eta: float | None = None
        for event in client.events(f"/v1/jobs/{job['id']}/stream", until_end=True):
            if not event.data:
                continue
            data = json.loads(event.data)["data"]
            eta = (data.get("upstream") or {}).get("eta") or eta
            done = PROCESSING_SHARE * min(1.0, (time.monotonic() - started) / eta) if eta else 0
            progress.update(task, description=data["status"], completed=done)
            if event.event in TERMINAL_TYPES:
                progress.update(task, completed=1.0 if event.event == "job.completed" else done)
                break
    return client.job(job["id"])


def save_output(client: Client, job: dict[str, Any], destination: Path, console: Console) -> int:
    """Download the job's first stored output with a byte progress bar."""
    stored = [output for output in job["outputs"] if output.get("url")]
    if not stored:
        raise ClientError(f"job {job['id']} completed without a stored output")
    output = stored[0]
    with Progress(console=console) as progress:
        task = progress.add_task(f"saving {destination}", total=output.get("bytes"))
        return client.download(output["url"], destination, lambda n: progress.advance(task, n))


def forward(envelope: dict[str, Any], target: str, secret: str) -> requests.Response:
    """POST the envelope to ``target`` signed like a motionhook webhook (Standard Webhooks)."""
    message = render(envelope, [secret])
    return requests.post(target, data=message.body, headers=message.headers, timeout=TIMEOUT)


def listen(
    client: Client,
    *,
    console: Console,
    forward_to: str | None,
    secret: str | None,
    event_type: str | None,
) -> None:
    """Print events as they happen (and forward each, signed) until interrupted."""
    signing_secret = secret or generate_secret()
    if forward_to:
        console.print(
            f"Forwarding events to [bold]{forward_to}[/bold], signed with "
            f"[bold]{signing_secret}[/bold] (verify webhook-signature with it)"
        )
    query = f"?type={event_type}" if event_type else ""
    console.print(f"Listening to {client.base_url}/v1/events/stream{query} (Ctrl-C stops)")
    for event in client.events(f"/v1/events/stream{query}"):
        if not event.data:
            continue
        envelope = json.loads(event.data)
        data = envelope.get("data") or {}
        subject = data.get("id", "") if event.event != "test.ping" else data.get("message", "")
        line = f"{envelope['created_at']}  {event.event:<15} {subject}  [dim]{event.id}[/dim]"
        if forward_to:
            try:
                answer = forward(envelope, forward_to, signing_secret)
                line += f"  → {answer.status_code}"
            except requests.RequestException as exc:
                line += f"  → [red]{type(exc).__name__}[/red]"
        console.print(line, highlight=False)
