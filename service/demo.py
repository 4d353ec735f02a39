"""``motionhook demo``: one real round trip, proven from the outside.

It starts the simulator, web and worker on free loopback ports with a throwaway
SQLite database, submits the bundled sample image with a per-job webhook, and
succeeds only when the signed ``job.completed`` arrives, its signature verifies,
and the durable video it points to is a real, playable file.
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from standardwebhooks import Webhook

from service.devstack import SAMPLE_IMAGE, Stack
from service.notifiers.webhook import generate_secret


def start_receiver() -> tuple[ThreadingHTTPServer, queue.Queue[tuple[dict[str, str], bytes]]]:
    """Start a local HTTP receiver that queues every POST it gets."""
    received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.put(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def video_frames(path: Path) -> int:
    """Return the number of frames ffmpeg decodes from ``path`` (0 if it is not a video)."""
    import imageio_ffmpeg

    try:
        frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError):
        return 0
    return int(frames)


def run_demo(say: Callable[[str], None], *, timeout: float = 120) -> bool:
    """Run the round trip; return True only when every check passed."""
    secret = generate_secret()
    with tempfile.TemporaryDirectory(prefix="motionhook-demo-") as tmp:
        stack = Stack(Path(tmp), env={"MOTIONHOOK_WEBHOOK_SECRET": secret})
        server, received = start_receiver()
        try:
            say("starting simulator, web and worker ...")
            stack.start_all("--delay", "1")
            receiver_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
            with SAMPLE_IMAGE.open("rb") as image:
                response = stack.api().post(
                    f"{stack.web_url}/v1/jobs",
                    files={"image": ("sample.png", image, "image/png")},
                    data={
                        "prompt": "a slow zoom over the sample",
                        "num_frames": "16",
                        "webhook_url": receiver_url,
                        "webhook_events": json.dumps(["job.completed", "job.failed"]),
                    },
                    timeout=10,
                )
            if response.status_code != 202:
                say(f"FAIL: POST /v1/jobs answered {response.status_code}: {response.text}")
                return False
            job_id = response.json()["id"]
            say(f"submitted {job_id}; waiting for the signed webhook ...")
            try:
                headers, body = received.get(timeout=timeout)
            except queue.Empty:
                say("FAIL: no webhook arrived in time")
                return False
            event = Webhook(secret).verify(body, headers)
            say(f"webhook {event['type']} arrived and its signature verifies")
            if event["type"] != "job.completed":
                say(f"FAIL: job ended as {event['type']}: {event['data'].get('error')}")
                return False
            output = event["data"]["outputs"][0]
            video = requests.get(output["url"], timeout=30)
            path = Path(tmp) / "video.mp4"
            path.write_bytes(video.content)
            frames = video_frames(path)
            if video.status_code != 200 or frames <= 0:
                say(f"FAIL: the stored video is not playable (HTTP {video.status_code})")
                return False
            say(
                f"stored video: {len(video.content)} bytes, {frames} frames, "
                f"sha256 {output['sha256'][:12]}..."
            )
            say("OK: full round trip completed")
            return True
        finally:
            server.shutdown()
            stack.stop()
