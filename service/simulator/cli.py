"""``simulate``: serve the ModelsLab simulator until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click
from marshmallow import ValidationError
from werkzeug.serving import make_server

from .app import create_simulator_app, get_simulator
from .knobs import OUTPUT_TYPES, SimulatorKnobs
from .wire import describe_validation_error

logger = logging.getLogger(__name__)

_DEFAULTS = SimulatorKnobs()


@click.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8010, show_default=True, help="Port to listen on (0: any free).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Require this key; repeat for several accounts (any key is accepted if unset).",
)
@click.option(
    "--public-url", default=None, help="Base URL of output and fetch links (default: request host)."
)
@click.option("--delay", default=_DEFAULTS.delay, show_default=True, help="Seconds until callback.")
@click.option("--eta", default=_DEFAULTS.eta, show_default=True, help="Reported eta, in seconds.")
@click.option(
    "--duplicate-callbacks",
    default=_DEFAULTS.duplicate_callbacks,
    show_default=True,
    help="Extra copies of each callback.",
)
@click.option("--drop-callback", is_flag=True, help="Never send callbacks (fetch still works).")
@click.option("--immediate-success", is_flag=True, help="Answer success at once.")
@click.option(
    "--no-callback-on-immediate", is_flag=True, help="With --immediate-success, skip the callback."
)
@click.option("--fail-generation", is_flag=True, help="Generations end in a failed callback.")
@click.option("--error-next", default=0, show_default=True, help="Next N submits answer error.")
@click.option("--rate-limit-next", default=0, show_default=True, help="Next N submits get 429.")
@click.option(
    "--rate-limit-retry-after",
    default=_DEFAULTS.rate_limit_retry_after,
    show_default=True,
    help="retry_after of 429 answers.",
)
@click.option(
    "--max-queued",
    default=_DEFAULTS.max_queued,
    show_default=True,
    help="ModelsLab's queued-request cap: 429 while N jobs of one key process (0: off).",
)
@click.option(
    "--held-slots",
    default=_DEFAULTS.held_slots,
    show_default=True,
    help="Slots of each key's cap held by another program sharing the account.",
)
@click.option("--server-error-next", default=0, show_default=True, help="Next N submits get 500.")
@click.option(
    "--future-link-404s", default=0, show_default=True, help="First N GETs of each output 404."
)
@click.option("--callback-before-response", is_flag=True, help="Call back before answering.")
@click.option(
    "--output-type-override", type=click.Choice(OUTPUT_TYPES), default=None, help="Force a type."
)
@click.option(
    "--callback-timeout",
    default=_DEFAULTS.callback_timeout,
    show_default=True,
    help="Timeout of each callback POST, in seconds.",
)
def simulate_command(
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    public_url: str | None,
    delay: float,
    eta: int,
    duplicate_callbacks: int,
    drop_callback: bool,
    immediate_success: bool,
    no_callback_on_immediate: bool,
    fail_generation: bool,
    error_next: int,
    rate_limit_next: int,
    rate_limit_retry_after: int,
    max_queued: int,
    held_slots: int,
    server_error_next: int,
    future_link_404s: int,
    callback_before_response: bool,
    output_type_override: str | None,
    callback_timeout: float,
) -> None:
    """Run a local stand-in for the ModelsLab image-to-video API."""
    try:
        knobs = _DEFAULTS.updated(
            {
                "delay": delay,
                "eta": eta,
                "duplicate_callbacks": duplicate_callbacks,
                "drop_callback": drop_callback,
                "immediate_success": immediate_success,
                "callback_on_immediate": not no_callback_on_immediate,
                "fail_generation": fail_generation,
                "error_next": error_next,
                "rate_limit_next": rate_limit_next,
                "rate_limit_retry_after": rate_limit_retry_after,
                "max_queued": max_queued,
                "held_slots": held_slots,
                "server_error_next": server_error_next,
                "future_link_404s": future_link_404s,
                "callback_before_response": callback_before_response,
                "output_type_override": output_type_override,
                "callback_timeout": callback_timeout,
            }
        )
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc)) from exc
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_simulator_app(knobs, api_keys=api_keys, public_url=public_url)
    server = make_server(host, port, app, threaded=True)
    url = f"http://{host}:{server.server_port}"
    click.echo(f"ModelsLab simulator listening on {url} (POST {url}/api/v6/video/img2video)")
    logger.info("simulator knobs: %s", knobs.as_dict())
    stop = threading.Event()
    serving = threading.Thread(target=server.serve_forever, name="simulator-server", daemon=True)
    with _stop_on_signals(stop):
        serving.start()
        while not stop.wait(0.5):  # wake up now and then so signal handlers always run
            pass
    logger.info("simulator shutting down")
    server.shutdown()
    serving.join()
    server.server_close()
    get_simulator(app).close()


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM/SIGINT; restore the previous handlers afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled in the main thread
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
