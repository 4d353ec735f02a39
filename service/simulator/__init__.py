"""A faithful local stand-in for ModelsLab's image-to-video API.

Same paths, validation and answer shapes as ModelsLab, integer ids, ``processing``
answers with ``eta``/``fetch_result``/``future_links``, a real MP4 or GIF rendered
from the init image, and a callback to ``webhook`` -- plus fault knobs (delays,
duplicate or dropped callbacks, errors, rate limits) settable at runtime through
``/_sim/knobs``. Each key is an account with its own queued-request cap, and
``/_sim/stats`` counts requests by account.
"""

from .app import create_simulator_app, get_simulator
from .cli import simulate_command
from .engine import Reply, Simulator, key_fingerprint
from .knobs import SimulatorKnobs
from .render import RenderError, render_video

__all__ = [
    "RenderError",
    "Reply",
    "Simulator",
    "SimulatorKnobs",
    "create_simulator_app",
    "get_simulator",
    "key_fingerprint",
    "render_video",
    "simulate_command",
]
