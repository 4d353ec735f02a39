"""The ``motionhook`` command: dev, worker, db upgrade, simulate, demo, prune."""

from __future__ import annotations

import click

from service.config import ConfigError


def load_services(overrides: dict[str, object] | None = None, *, api: bool = True):  # type: ignore[no-untyped-def]
    """Build settings and services the same way the web app does (``api``: with its routes)."""
    from service import create_app
    from service.extension import Services

    try:
        app = create_app(overrides, api=api)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    services: Services = app.extensions["motionhook"]
    return app, services


@click.group()
def main() -> None:
    """motionhook: ModelsLab image-to-video jobs, callbacks and fan-out."""


@main.group()
def db() -> None:
    """Database commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    from service.migrate import upgrade

    _app, services = load_services()
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
    _app, services = load_services(api=False)
    settings = services.settings
    init_sentry(settings, component="worker")
    if settings.worker_metrics_port:
        start_worker_server(services, settings.worker_metrics_host, settings.worker_metrics_port)
    run_worker(services, once=once)


@main.command()
@click.option("--port", default=8000, show_default=True, help="Port of the web process.")
@click.option("--simulator-port", default=8010, show_default=True)
def dev(port: int, simulator_port: int) -> None:
    """Run web + worker + the ModelsLab simulator on SQLite (what `make run` does)."""
    import os
    import signal
    import time
    from pathlib import Path

    from service.devstack import SAMPLE_IMAGE, Stack
    from service.migrate import upgrade

    app, services = load_services()
    settings = services.settings
    upgrade(services.db)
    use_simulator = not os.environ.get("MOTIONHOOK_MODELSLAB_API_KEY")
    user_env = {k: v for k, v in os.environ.items() if k.startswith("MOTIONHOOK_")}
    stack = Stack(
        Path(app.instance_path),
        env=user_env,
        web_port=port,
        sim_port=simulator_port,
        token=settings.api_tokens[0],
        simulator=use_simulator,
    )
    stack.env.setdefault("MOTIONHOOK_PUBLIC_URL", stack.web_url)
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
Database: {settings.database_url}   logs: {app.instance_path}/*.log
API token: {token}

Submit the bundled sample image:
  curl -s -H "Authorization: Bearer {token}" -F image=@{SAMPLE_IMAGE} \\
       -F prompt="a slow zoom over the hills" {base}/v1/jobs

Then watch it complete (about two seconds):
  curl -s -H "Authorization: Bearer {token}" {base}/v1/jobs/<id from above>

Ctrl-C stops everything.
"""
    )

    def stop_on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # The children run in their own sessions: make SIGTERM stop them too.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        while all(process.popen.poll() is None for process in stack.processes):
            time.sleep(0.5)
        failed = [p.name for p in stack.processes if p.popen.poll() is not None]
        raise click.ClickException(f"{', '.join(failed)} stopped; see {app.instance_path}/*.log")
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
    from service.prune import parse_duration

    try:
        return parse_duration(value)
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
    _app, services = load_services()
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


def _register_optional() -> None:
    from service.simulator import simulate_command

    main.add_command(simulate_command, "simulate")


_register_optional()


if __name__ == "__main__":
    main()
