"""The ``motionhook`` command: dev, worker, db upgrade, simulate, demo, prune."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from service.config import ConfigError

if TYPE_CHECKING:
    from service.extension import Services


def load_services(overrides: dict[str, object] | None = None) -> Services:
    """Build settings, services and logging the way web does, without the web app."""
    from service.config import Settings
    from service.extension import Services
    from service.observability import configure_logging

    try:
        settings = Settings.load(overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(settings)
    return Services.build(settings)


class _Commands(click.Group):
    """The command group; ``simulate`` is imported only when it is asked for.

    The simulator pulls in Pillow, imageio-ffmpeg and its own Flask app: imported
    with the group, they cost every ``motionhook worker`` about 3 MB and 0.1 s.
    """

    LAZY = {"simulate": ("service.simulator", "simulate_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            import importlib

            module, attribute = self.LAZY[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
def main() -> None:
    """motionhook: ModelsLab image-to-video jobs, callbacks and fan-out."""


@main.group()
def db() -> None:
    """Database commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    from service.migrate import upgrade

    services = load_services()
    upgrade(services.db)
    click.echo("database is at the newest migration")


@main.command()
@click.option("--once", is_flag=True, help="Run until no work is due, then exit.")
def worker(once: bool) -> None:
    """Run the worker: submit, download, reconcile, deliver."""
    from service.metrics import start_worker_server
    from service.observability import init_sentry, set_component
    from service.worker import run_worker

    set_component("worker")
    services = load_services()
    settings = services.settings
    init_sentry(settings, component="worker")
    if settings.worker_metrics_port:
        start_worker_server(services, settings.worker_metrics_host, settings.worker_metrics_port)
    run_worker(services, once=once)


# How to choose each of dev's ports: the Makefile's variable and the option.
DEV_PORT_OPTIONS = {"web": ("PORT", "--port"), "simulator": ("SIMULATOR_PORT", "--simulator-port")}


@main.command()
@click.option("--port", default=8000, show_default=True, help="Port of the web process.")
@click.option("--simulator-port", default=8010, show_default=True)
def dev(port: int, simulator_port: int) -> None:
    """Run web + worker + the ModelsLab simulator on SQLite (what `make run` does)."""
    import os
    import signal
    import time

    from service.devstack import SAMPLE_IMAGE, PortTaken, Stack, StartError, check_ports_free
    from service.migrate import upgrade

    use_simulator = not os.environ.get("MOTIONHOOK_MODELSLAB_API_KEY")
    ports = {"web": port, **({"simulator": simulator_port} if use_simulator else {})}
    try:
        check_ports_free(ports)
    except PortTaken as exc:
        variable, option = DEV_PORT_OPTIONS[exc.name]
        raise click.ClickException(
            f"{exc}; pick another, e.g. make run {variable}={exc.port + 1} "
            f"(motionhook dev {option} {exc.port + 1})"
        ) from None
    services = load_services()
    settings = services.settings
    upgrade(services.db)
    user_env = {k: v for k, v in os.environ.items() if k.startswith("MOTIONHOOK_")}
    stack = Stack(
        settings.instance_path,
        env=user_env,
        web_port=port,
        sim_port=simulator_port,
        token=settings.api_tokens[0],
        simulator=use_simulator,
    )
    stack.env.setdefault("MOTIONHOOK_PUBLIC_URL", stack.web_url)

    def stop_on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # The children run in their own sessions: make SIGTERM stop them too.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        if use_simulator:
            stack.start_simulator()
        stack.start_web()
        stack.start_worker()
        token = settings.api_tokens[0]
        base = stack.web_url
        click.echo(
            f"""
motionhook is running: web {base} (docs {base}/docs), worker, """
            + (f"ModelsLab simulator {stack.sim_url}" if use_simulator else "real ModelsLab")
            + f"""
Database: {settings.database_url}   logs: {settings.instance_path}/*.log
API token: {token}

Submit the bundled sample image:
  curl -s -H "Authorization: Bearer {token}" -F image=@{SAMPLE_IMAGE} \\
       -F prompt="a slow zoom over the hills" {base}/v1/jobs

Then watch it complete (about two seconds):
  curl -s -H "Authorization: Bearer {token}" {base}/v1/jobs/<id from above>

Ctrl-C stops everything.
"""
        )
        while all(process.popen.poll() is None for process in stack.processes):
            time.sleep(0.5)
        failed = [p.name for p in stack.processes if p.popen.poll() is not None]
        logs = settings.instance_path / "*.log"
        raise click.ClickException(f"{', '.join(failed)} stopped; see {logs}")
    except StartError as exc:
        raise click.ClickException(exc.summary) from None
    except KeyboardInterrupt:
        click.echo("stopping ...")
    finally:
        stack.stop()


@main.command()
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for the video.")
def demo(timeout: float) -> None:
    """Run one full round trip; exit 0 only on a signed job.completed with a playable video."""
    from service.demo import run_demo

    if not run_demo(click.echo, timeout=timeout):
        raise SystemExit(1)


def _duration(_ctx: object, _param: object, value: str) -> object:
    from datetime import timedelta

    from service.config import parse_duration

    try:
        return timedelta(seconds=parse_duration(value, unit_required=True, positive=True))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    callback=_duration,
    help="Age cutoff such as 30d, 12h or 90m.",
)
@click.option("--media", is_flag=True, help="Also delete stored outputs and uploads of old jobs.")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
def prune(older_than: object, media: bool, batch_size: int, dry_run: bool) -> None:
    """Delete old raw callbacks, delivery response bodies and (with --media) stored media."""
    from datetime import timedelta

    from service.prune import prune as run_prune

    assert isinstance(older_than, timedelta)
    services = load_services()
    report = run_prune(
        services.db,
        services.storage,
        older_than=older_than,
        include_media=media,
        batch_size=batch_size,
        dry_run=dry_run,
    )
    verb = "would delete" if dry_run else "deleted"
    summary = (
        f"{verb} (before {report.as_dict()['cutoff']}): {report.callbacks_deleted} raw "
        f"callbacks, {report.attempt_bodies_cleared} delivery response bodies"
    )
    if media:
        summary += (
            f", {report.media_objects_deleted} media objects of {report.media_jobs_pruned} jobs"
        )
    click.echo(summary)
    if report.media_failures:
        raise click.ClickException(
            f"{report.media_failures} jobs kept their media: storage refused the delete "
            "(see the log); run again later"
        )


if __name__ == "__main__":
    main()
