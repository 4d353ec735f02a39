"""The ModelsLab simulator, exercised over real sockets on 127.0.0.1."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import requests
from flask import Flask, Response, redirect
from flask import request as flask_request
from PIL import Image
from werkzeug.serving import make_server

from service.simulator import (
    RenderError,
    SimulatorKnobs,
    create_simulator_app,
    get_simulator,
    key_fingerprint,
    render_video,
)

API_KEY = "test-key"
OTHER_KEY = "another-account-key"
WAIT = 15.0  # deadline for anything asynchronous: tests wait on conditions, never fixed sleeps
FAST = SimulatorKnobs(delay=0.1, eta=3)


def make_png(width: int = 96, height: int = 80) -> bytes:
    image = Image.new("RGB", (width, height), (30, 60, 200))
    for x in range(width):
        for y in range(0, height, 8):
            image.putpixel((x, y), (x * 2 % 256, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PNG = make_png()


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve ``app`` with werkzeug's threaded server on a free port; yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


class Receiver:
    """A local HTTP server that hosts init images and records the callbacks it gets."""

    def __init__(self) -> None:
        self.callbacks: list[dict[str, Any]] = []
        self.answer_status = 204
        self._arrived = threading.Condition()
        self.app = Flask("receiver")
        self.app.add_url_rule("/hook", "hook", self._hook, methods=["POST"])
        self.app.add_url_rule("/image.png", "image", lambda: Response(PNG, mimetype="image/png"))
        self.app.add_url_rule("/moved.png", "moved", lambda: redirect("/image.png", code=302))
        self.app.add_url_rule("/text.png", "text", lambda: Response("hi", mimetype="image/png"))
        self.base_url = ""

    @property
    def hook(self) -> str:
        return f"{self.base_url}/hook"

    @property
    def image(self) -> str:
        return f"{self.base_url}/image.png"

    def _hook(self) -> Response:
        with self._arrived:
            self.callbacks.append(flask_request.get_json())
            self._arrived.notify_all()
        return Response(status=self.answer_status)

    def wait_for_callbacks(self, count: int) -> list[dict[str, Any]]:
        with self._arrived:
            arrived = self._arrived.wait_for(lambda: len(self.callbacks) >= count, WAIT)
        assert arrived, f"expected {count} callbacks, got {len(self.callbacks)}"
        return list(self.callbacks)


class Sim:
    """A running simulator and a client for it."""

    def __init__(self, app: Flask, base_url: str, receiver: Receiver) -> None:
        self.app = app
        self.base_url = base_url
        self.receiver = receiver
        self.http = requests.Session()

    def submit(self, **overrides: Any) -> requests.Response:
        body: dict[str, Any] = {
            "key": API_KEY,
            "model_id": "wan2.2",
            "init_image": self.receiver.image,
            "width": 64,
            "height": 48,
            "num_frames": 6,
            "fps": 8,
            "webhook": self.receiver.hook,
            "track_id": "track-1",
        }
        body.update(overrides)
        return self.http.post(f"{self.base_url}/api/v6/video/img2video", json=body, timeout=WAIT)

    def fetch(self, job_id: object, key: str = API_KEY) -> requests.Response:
        url = f"{self.base_url}/api/v6/video/fetch/{job_id}"
        return self.http.post(url, json={"key": key}, timeout=WAIT)

    def set_knobs(self, **changes: Any) -> dict[str, Any]:
        response = self.http.put(f"{self.base_url}/_sim/knobs", json=changes, timeout=WAIT)
        assert response.status_code == 200, response.text
        knobs: dict[str, Any] = response.json()
        return knobs

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get(f"{self.base_url}/_sim/stats", timeout=WAIT).json()
        return stats

    def wait_idle(self) -> None:
        assert get_simulator(self.app).wait_idle(WAIT)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with serve(receiver.app) as base_url:
        receiver.base_url = base_url
        yield receiver


@pytest.fixture
def sim(receiver: Receiver) -> Iterator[Sim]:
    app = create_simulator_app(FAST, api_keys=(API_KEY, OTHER_KEY))
    with serve(app) as base_url:
        client = Sim(app, base_url, receiver)
        yield client
        client.http.close()
        get_simulator(app).close()


def gif_frames(data: bytes) -> int:
    """Count the frames of a GIF with Pillow."""
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.format == "GIF"
        frames: int = getattr(gif, "n_frames", 1)
        return frames


def video_info(data: bytes, tmp_path: Path) -> tuple[int, tuple[int, int], str]:
    """Decode an MP4 fully with ffmpeg: (frame count, size, ffmpeg's stream description)."""
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta: dict[str, Any] = next(reader)
    reader.close()
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    stream = next(line for line in probe.stderr.splitlines() if "Video:" in line)
    width, height = meta["size"]
    return frames, (width, height), stream


# -- render_video ------------------------------------------------------------------------------


def test_render_video_makes_h264_mp4_with_requested_frames(tmp_path: Path) -> None:
    data = render_video(PNG, width=64, height=48, num_frames=7, fps=8, output_type="mp4")

    frames, size, stream = video_info(data, tmp_path)
    assert (frames, size) == (7, (64, 48))
    assert "h264" in stream
    assert "yuv420p" in stream


def test_render_video_rounds_mp4_dimensions_down_to_even(tmp_path: Path) -> None:
    data = render_video(PNG, width=65, height=33, num_frames=3, fps=4, output_type="mp4")

    frames, size, _ = video_info(data, tmp_path)
    assert (frames, size) == (3, (64, 32))


def test_render_video_makes_gif_with_requested_frames() -> None:
    data = render_video(PNG, width=40, height=40, num_frames=9, fps=10, output_type="gif")

    assert gif_frames(data) == 9
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.size == (40, 40)
        assert gif.info["duration"] == 100


def test_render_video_keeps_frames_of_a_flat_image_distinct() -> None:
    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    buffer = io.BytesIO()
    flat.save(buffer, format="PNG")

    data = render_video(
        buffer.getvalue(), width=32, height=32, num_frames=5, fps=8, output_type="gif"
    )

    assert gif_frames(data) == 5


def test_render_video_rejects_bytes_that_are_not_an_image() -> None:
    with pytest.raises(RenderError):
        render_video(b"not an image", width=32, height=32, num_frames=2, fps=8, output_type="gif")


# -- submit, callback, outputs -----------------------------------------------------------------


def test_submit_answers_processing_like_modelslab(sim: Sim) -> None:
    response = sim.submit(model_id="no-such-model", prompt="a boat")

    assert response.status_code == 200
    body = response.json()
    job_id = body["id"]
    assert isinstance(job_id, int)
    assert body["status"] == "processing"
    assert body["eta"] == 3
    assert body["output"] == []
    assert body["fetch_result"] == f"{sim.base_url}/api/v6/video/fetch/{job_id}"
    assert body["future_links"] == [f"{sim.base_url}/outputs/{job_id}.mp4"]
    assert body["message"] and body["tip"]
    meta = body["meta"]
    assert meta["model_id"] == "wan2.2"
    assert meta["track_id"] == "track-1"
    assert meta["webhook"] == sim.receiver.hook
    assert meta["num_frames"] == 6 and meta["prompt"] == "a boat"
    assert "key" not in meta


def test_submit_ids_are_increasing_integers(sim: Sim) -> None:
    first, second = sim.submit().json()["id"], sim.submit().json()["id"]

    assert second == first + 1


def test_callback_delivers_a_real_mp4(sim: Sim, tmp_path: Path) -> None:
    job_id = sim.submit().json()["id"]

    (callback,) = sim.receiver.wait_for_callbacks(1)

    output_url = f"{sim.base_url}/outputs/{job_id}.mp4"
    assert callback["status"] == "success"
    assert callback["id"] == job_id
    assert callback["output"] == [output_url]
    assert callback["proxy_links"] == [output_url]
    assert callback["track_id"] == "track-1"
    assert callback["meta"]["track_id"] == "track-1"
    assert isinstance(callback["generationTime"], float)
    video = sim.http.get(output_url, timeout=WAIT)
    assert video.status_code == 200
    assert video.headers["Content-Type"] == "video/mp4"
    assert int(video.headers["Content-Length"]) == len(video.content)
    frames, size, _ = video_info(video.content, tmp_path)
    assert (frames, size) == (6, (64, 48))


def test_callback_delivers_a_gif_when_asked(sim: Sim) -> None:
    job_id = sim.submit(output_type="gif", num_frames=4).json()["id"]

    (callback,) = sim.receiver.wait_for_callbacks(1)

    assert callback["output"] == [f"{sim.base_url}/outputs/{job_id}.gif"]
    video = sim.http.get(callback["output"][0], timeout=WAIT)
    assert video.headers["Content-Type"] == "image/gif"
    assert gif_frames(video.content) == 4


def test_output_type_override_knob_renders_another_type(sim: Sim) -> None:
    sim.set_knobs(output_type_override="gif")

    body = sim.submit(output_type="mp4").json()

    assert body["future_links"][0].endswith(f"/outputs/{body['id']}.gif")


def test_output_serves_byte_ranges(sim: Sim) -> None:
    sim.submit()
    (callback,) = sim.receiver.wait_for_callbacks(1)

    partial = sim.http.get(callback["output"][0], headers={"Range": "bytes=0-9"}, timeout=WAIT)

    assert partial.status_code == 206
    assert len(partial.content) == 10


def test_fetch_while_processing_answers_output_as_empty_string(sim: Sim) -> None:
    sim.set_knobs(delay=60)
    job_id = sim.submit().json()["id"]

    body = sim.fetch(job_id).json()

    assert body["status"] == "processing"
    assert body["id"] == job_id
    assert body["output"] == ""
    assert 1 <= body["eta"] <= 3


def test_fetch_after_completion_answers_success(sim: Sim) -> None:
    job_id = sim.submit().json()["id"]
    sim.wait_idle()

    body = sim.fetch(job_id).json()

    assert body["status"] == "success"
    assert body["output"] == [f"{sim.base_url}/outputs/{job_id}.mp4"]
    assert body["meta"]["track_id"] == "track-1"


def test_fetch_of_unknown_id_answers_error(sim: Sim) -> None:
    response = sim.fetch(999_999)

    assert response.status_code == 200
    assert response.json()["status"] == "error"


def test_fetch_with_wrong_key_is_unauthorized(sim: Sim) -> None:
    job_id = sim.submit().json()["id"]

    response = sim.fetch(job_id, key="wrong")

    assert response.status_code == 401


def test_output_is_404_for_an_unknown_job(sim: Sim) -> None:
    response = sim.http.get(f"{sim.base_url}/outputs/424242.mp4", timeout=WAIT)

    assert response.status_code == 404
    assert response.json()["status"] == "error"


def test_public_url_is_the_base_of_links(receiver: Receiver) -> None:
    app = create_simulator_app(
        SimulatorKnobs(delay=0), api_keys=(API_KEY,), public_url="https://sim.example/"
    )
    body = app.test_client().post(
        "/api/v6/video/img2video",
        json={"key": API_KEY, "init_image": receiver.image, "width": 32, "height": 32},
    )

    assert body.json is not None
    job_id = body.json["id"]
    assert body.json["fetch_result"] == f"https://sim.example/api/v6/video/fetch/{job_id}"
    assert body.json["future_links"] == [f"https://sim.example/outputs/{job_id}.mp4"]
    get_simulator(app).close()


# -- validation and init_image -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"width": 1024}, "width"),
        ({"height": 513}, "height"),
        ({"num_frames": 26}, "num_frames"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"min_guidance_scale": 0.5}, "min_guidance_scale"),
        ({"max_guidance_scale": 9}, "max_guidance_scale"),
        ({"noise_aug_strength": 1.5}, "noise_aug_strength"),
        ({"fps": 17}, "fps"),
        ({"output_type": "webm"}, "output_type"),
        ({"init_image": "ftp://example.com/a.png"}, "init_image"),
        ({"init_image": None}, "init_image"),
        ({"webhook": "not a url"}, "webhook"),
    ],
)
def test_invalid_parameter_is_a_400_naming_the_field(
    sim: Sim, overrides: dict[str, Any], field: str
) -> None:
    response = sim.submit(**overrides)

    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "error"
    assert field in body["message"]


def test_missing_init_image_is_a_400(sim: Sim) -> None:
    body = {"key": API_KEY, "width": 64}

    response = sim.http.post(f"{sim.base_url}/api/v6/video/img2video", json=body, timeout=WAIT)

    assert response.status_code == 400
    assert "init_image" in response.json()["message"]


def test_wrong_api_key_is_a_401(sim: Sim) -> None:
    response = sim.submit(key="wrong")

    assert response.status_code == 401
    assert response.json() == {"status": "error", "message": "Invalid API key"}


def test_redirecting_init_image_is_refused(sim: Sim) -> None:
    response = sim.submit(init_image=f"{sim.receiver.base_url}/moved.png")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "error"
    assert "redirect" in body["message"]
    assert sim.stats()["jobs"] == {}


def test_unreachable_init_image_is_an_error(sim: Sim) -> None:
    with socket.socket() as sock:  # a port that nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    response = sim.submit(init_image=f"http://127.0.0.1:{port}/image.png")

    assert response.status_code == 200
    assert response.json()["status"] == "error"


def test_init_image_that_is_not_an_image_is_an_error(sim: Sim) -> None:
    response = sim.submit(init_image=f"{sim.receiver.base_url}/text.png")

    assert response.status_code == 200
    assert "not a valid image" in response.json()["message"]


# -- fault knobs -------------------------------------------------------------------------------


def test_rate_limit_knob_answers_429_then_recovers(sim: Sim) -> None:
    sim.set_knobs(rate_limit_next=1, rate_limit_retry_after=7)

    limited, accepted = sim.submit(), sim.submit()

    assert limited.status_code == 429
    assert limited.json() == {
        "status": "error",
        "message": "Rate limit exceeded. Maximum 5 queued requests allowed.",
        "retry_after": 7,
    }
    assert accepted.json()["status"] == "processing"
    assert sim.set_knobs()["rate_limit_next"] == 0


def test_max_queued_knob_answers_429_while_the_queue_is_full(sim: Sim) -> None:
    sim.set_knobs(max_queued=1, delay=60)
    sim.submit()

    response = sim.submit()

    assert response.status_code == 429
    assert response.json()["message"] == "Rate limit exceeded. Maximum 1 queued requests allowed."


def test_each_key_is_an_account_with_its_own_cap_and_counts(sim: Sim) -> None:
    sim.set_knobs(max_queued=1, delay=60)
    first = sim.submit()
    other = sim.submit(key=OTHER_KEY)
    refused = sim.submit()
    sim.fetch(other.json()["id"], key=OTHER_KEY)

    assert [first.status_code, other.status_code, refused.status_code] == [200, 200, 429]
    accounts = sim.stats()["accounts"]
    assert set(accounts) == {key_fingerprint(API_KEY), key_fingerprint(OTHER_KEY)}
    mine, theirs = accounts[key_fingerprint(API_KEY)], accounts[key_fingerprint(OTHER_KEY)]
    assert mine["submits"] == 2 and mine["fetches"] == 0 and mine["outstanding"] == 1
    assert mine["http_statuses"]["submit"] == {"200": 1, "429": 1}
    assert theirs["submits"] == 1 and theirs["fetches"] == 1 and theirs["max_outstanding"] == 1
    assert sim.stats()["max_outstanding"] == 2
    assert API_KEY not in str(accounts) and OTHER_KEY not in str(accounts)


def test_error_knob_answers_error_with_http_200(sim: Sim) -> None:
    sim.set_knobs(error_next=1)

    response = sim.submit()

    assert response.status_code == 200
    assert response.json()["status"] == "error"
    assert response.json()["message"]
    assert sim.stats()["answered"]["submit"] == {"error": 1}


def test_server_error_knob_answers_500(sim: Sim) -> None:
    sim.set_knobs(server_error_next=2)

    statuses = [sim.submit().status_code for _ in range(3)]

    assert statuses == [500, 500, 200]


def test_drop_callback_knob_sends_nothing_but_fetch_succeeds(sim: Sim) -> None:
    sim.set_knobs(drop_callback=True)
    job_id = sim.submit().json()["id"]
    sim.wait_idle()

    body = sim.fetch(job_id).json()

    assert body["status"] == "success"
    assert sim.receiver.callbacks == []
    assert sim.stats()["callbacks_sent"] == 0


def test_duplicate_callbacks_knob_sends_extra_copies(sim: Sim) -> None:
    sim.set_knobs(duplicate_callbacks=2)
    sim.submit()

    callbacks = sim.receiver.wait_for_callbacks(3)
    sim.wait_idle()

    assert len(callbacks) == 3
    assert callbacks[0] == callbacks[1] == callbacks[2]
    assert sim.stats()["callbacks_sent"] == 3


def test_future_link_404s_knob_hides_outputs_for_the_first_requests(sim: Sim) -> None:
    sim.set_knobs(future_link_404s=2)
    sim.submit()
    (callback,) = sim.receiver.wait_for_callbacks(1)

    statuses = [sim.http.get(callback["output"][0], timeout=WAIT).status_code for _ in range(3)]

    assert statuses == [404, 404, 200]


def test_immediate_success_knob_answers_success_and_still_calls_back(
    sim: Sim, tmp_path: Path
) -> None:
    sim.set_knobs(immediate_success=True)

    body = sim.submit().json()

    assert body["status"] == "success"
    assert body["output"] == [f"{sim.base_url}/outputs/{body['id']}.mp4"]
    assert isinstance(body["generationTime"], float)
    assert body["meta"]["track_id"] == "track-1"
    video = sim.http.get(body["output"][0], timeout=WAIT)
    assert video_info(video.content, tmp_path)[0] == 6
    (callback,) = sim.receiver.wait_for_callbacks(1)
    assert callback["status"] == "success"


def test_immediate_success_without_callback_sends_none(sim: Sim) -> None:
    sim.set_knobs(immediate_success=True, callback_on_immediate=False)

    assert sim.submit().json()["status"] == "success"

    sim.wait_idle()
    assert sim.receiver.callbacks == []


def test_fail_generation_knob_calls_back_failed(sim: Sim) -> None:
    sim.set_knobs(fail_generation=True)
    job_id = sim.submit().json()["id"]

    (callback,) = sim.receiver.wait_for_callbacks(1)

    assert callback["status"] == "failed"
    assert callback["id"] == job_id
    assert callback["track_id"] == "track-1"
    assert callback["message"]
    assert sim.fetch(job_id).json()["status"] == "failed"
    assert sim.http.get(f"{sim.base_url}/outputs/{job_id}.mp4", timeout=WAIT).status_code == 404


def test_callback_before_response_knob_calls_back_before_answering(sim: Sim) -> None:
    sim.set_knobs(callback_before_response=True)

    body = sim.submit().json()

    # No waiting: the callback must already have been received when the answer arrives.
    assert [callback["id"] for callback in sim.receiver.callbacks] == [body["id"]]
    assert body["status"] == "processing"


# -- control API -------------------------------------------------------------------------------


def test_knobs_are_updated_partially(sim: Sim) -> None:
    knobs = sim.set_knobs(delay=0.5, eta=9)

    assert knobs == {**SimulatorKnobs().as_dict(), "delay": 0.5, "eta": 9}
    assert sim.http.get(f"{sim.base_url}/_sim/knobs", timeout=WAIT).json() == knobs


@pytest.mark.parametrize(
    "changes", [{"no_such_knob": 1}, {"eta": "soon"}, {"delay": -1}, {"output_type_override": "x"}]
)
def test_invalid_knobs_are_refused(sim: Sim, changes: dict[str, Any]) -> None:
    response = sim.http.put(f"{sim.base_url}/_sim/knobs", json=changes, timeout=WAIT)

    assert response.status_code == 400
    assert next(iter(changes)) in response.json()["message"]


def test_stats_record_callbacks_and_answers(sim: Sim) -> None:
    sim.receiver.answer_status = 500
    job_id = sim.submit().json()["id"]
    sim.receiver.wait_for_callbacks(1)
    sim.wait_idle()
    sim.fetch(job_id)

    stats = sim.stats()

    assert stats["submits"] == 1 and stats["fetches"] == 1
    assert stats["answered"] == {"submit": {"processing": 1}, "fetch": {"success": 1}}
    assert stats["callbacks_sent"] == 1 and stats["callbacks_failed"] == 1
    (record,) = stats["recent_callbacks"]
    assert record["url"] == sim.receiver.hook
    assert record["status_code"] == 500
    assert record["body"]["id"] == job_id
    assert record["sent_at"]


def test_unanswered_callback_is_retried_then_counted_failed(sim: Sim) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_hook = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sim.submit(webhook=dead_hook)
    sim.wait_idle()

    (record,) = sim.stats()["recent_callbacks"]

    assert record["status_code"] is None
    assert record["attempts"] == 3
    assert "ConnectionError" in record["error"]


def test_reset_forgets_jobs_and_stats(sim: Sim) -> None:
    sim.set_knobs(delay=60)
    job_id = sim.submit().json()["id"]

    response = sim.http.post(f"{sim.base_url}/_sim/reset", timeout=WAIT)

    assert response.status_code == 200
    assert sim.fetch(job_id).json()["status"] == "error"
    assert sim.stats()["submits"] == 0
    sim.wait_idle()  # the pending job was cancelled: no callback will come
    assert sim.receiver.callbacks == []


def test_sample_image_is_served(sim: Sim) -> None:
    response = sim.http.get(f"{sim.base_url}/_sim/sample.png", timeout=WAIT)

    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG"
        assert image.size == (512, 512)


# -- the simulate command ----------------------------------------------------------------------


def test_simulate_command_serves_until_sigterm() -> None:
    script = "from service.simulator import simulate_command; simulate_command()"
    command = [sys.executable, "-c", script, "--port", "0", "--delay", "0.25", "--error-next", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            base_url = next(word for word in banner.split() if word.startswith("http://"))

            knobs = requests.get(f"{base_url}/_sim/knobs", timeout=WAIT).json()

            assert knobs["delay"] == 0.25
            assert knobs["error_next"] == 2
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=WAIT) == 0
        finally:
            if process.poll() is None:
                process.kill()
