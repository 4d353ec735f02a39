"""The ``motionhook`` command: serve, worker, dev, db, simulate, demo, prune, projects,
tokens, discord, submit, listen."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from service.config import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.extension import Services
    from service.models import Project


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
@click.option(
    "--drain",
    "--once",
    "drain",
    is_flag=True,
    help="Run the work that is due, exit 0 once none is (cron jobs, scheduled runs).",
)
@click.option(
    "--max-seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="With --drain: stop claiming after this long and hand back what is held.",
)
def worker(drain: bool, max_seconds: float | None) -> None:
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
    if max_seconds is not None and not drain:
        raise click.BadParameter("only with --drain", param_hint="--max-seconds")
    report = run_worker(services, drain=drain, max_seconds=max_seconds)
    if drain:
        ran = ", ".join(f"{count} {lane}" for lane, count in report.ran.items())
        ending = "time budget used up" if report.budget_exhausted else "nothing left due"
        click.echo(f"drained in {report.seconds:.1f} s ({ending}): ran {ran}", err=True)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", envvar="PORT", default=8000, show_default=True, help="Port ($PORT).")
@click.option(
    "--threads",
    envvar="GUNICORN_THREADS",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Request threads ($GUNICORN_THREADS).",
)
@click.option(
    "--upgrade", is_flag=True, help="Apply pending migrations first (SQLite on a volume)."
)
@click.option(
    "--gunicorn-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("deploy/gunicorn.conf.py"),
    show_default=True,
    help="gunicorn settings file, read when it exists (workers and preload are overridden).",
)
def serve(host: str, port: int, threads: int, upgrade: bool, gunicorn_config: Path) -> None:
    """Run the web server and the worker in one process (one dyno, container or machine)."""
    # Until the app is built (service.serve says why): collections there find nothing.
    gc.disable()
    from service import create_app
    from service.serve import serve as run_serve

    services = load_services()
    if upgrade:
        from service.migrate import upgrade as upgrade_database

        upgrade_database(services.db)
    services.db.dispose()
    run_serve(
        create_app,
        bind=f"{host}:{port}",
        threads=threads,
        shutdown_grace=services.settings.shutdown_grace,
        config_file=gunicorn_config if gunicorn_config.is_file() else None,
    )


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


@main.command()
@click.argument("image_or_url")
@click.option("--prompt", required=True, help="What should happen in the video.")
@click.option("--model", "model_id", help="ModelsLab model: wan2.2 (default) or ltx-2.3.")
@click.option("--frames", "num_frames", type=click.IntRange(1, 25), help="Frames (1 to 25).")
@click.option("--wait", is_flag=True, help="Follow the job live until it completes or fails.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Save the video here (implies --wait).",
)
def submit(
    image_or_url: str,
    prompt: str,
    model_id: str | None,
    num_frames: int | None,
    wait: bool,
    output: Path | None,
) -> None:
    """Animate a local image file or an http(s) URL; print the job as JSON.

    Talks to MOTIONHOOK_URL (default http://127.0.0.1:8000) with MOTIONHOOK_TOKEN
    (default: the dev token in instance/api_token). With --wait, exits 0 only when
    the job completed.
    """
    from rich.console import Console

    from service.client import Client, ClientError, save_output, wait_for_job

    console = Console(stderr=True)
    params = {"prompt": prompt, "model_id": model_id, "num_frames": num_frames}
    try:
        client = Client.from_environment()
        job = client.submit(image_or_url, {k: v for k, v in params.items() if v is not None})
        console.print(f"job [bold]{job['id']}[/bold] {job['status']}")
        if wait or output:
            job = wait_for_job(client, job, console)
            if job["status"] == "completed" and output:
                size = save_output(client, job, output, console)
                console.print(f"saved {output} ({size} bytes)")
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(job))
    if (wait or output) and job["status"] != "completed":
        error = job.get("error") or {}
        console.print(f"[red]job {job['id']} {job['status']}: {error.get('message')}[/red]")
        raise SystemExit(1)


@main.command()
@click.option("--forward-to", help="POST every event here, signed (Standard Webhooks).")
@click.option("--secret", help="Sign forwarded events with this whsec_ secret (default: new).")
@click.option("--type", "event_type", help="Only events of this type, e.g. job.completed.")
def listen(forward_to: str | None, secret: str | None, event_type: str | None) -> None:
    """Print events live, like `stripe listen`; Ctrl-C stops."""
    from rich.console import Console

    from service.client import Client, ClientError
    from service.client import listen as follow

    try:
        follow(
            Client.from_environment(),
            console=Console(),
            forward_to=forward_to,
            secret=secret,
            event_type=event_type,
        )
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        pass


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


@main.group()
def discord() -> None:
    """The Discord app."""


@discord.command("register-commands")
@click.option("--guild", default=None, help="Register in this guild only (instant, for testing).")
def discord_register_commands(guild: str | None) -> None:
    """Register /animate with MOTIONHOOK_DISCORD_APPLICATION_ID and _BOT_TOKEN."""
    import requests

    from service.chat.common import ChatRefusal
    from service.chat.discord import register_commands

    settings = load_services().settings
    if not settings.discord_application_id or not settings.discord_bot_token:
        raise click.ClickException(
            "set MOTIONHOOK_DISCORD_APPLICATION_ID and MOTIONHOOK_DISCORD_BOT_TOKEN"
        )
    try:
        names = register_commands(
            requests.Session(),
            api_url=settings.discord_api_url,
            application_id=settings.discord_application_id,
            bot_token=settings.discord_bot_token,
            guild=guild,
        )
    except (ChatRefusal, requests.RequestException) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"registered {', '.join('/' + name for name in names)}")


SCOPE_CHOICE = click.Choice(["read", "write", "admin"])


@main.group()
def projects() -> None:
    """Projects: each sees only its own jobs, subscriptions and deliveries, and may bring
    its own ModelsLab key (set-key, clear-key)."""


@projects.command("create")
@click.argument("name")
def projects_create(name: str) -> None:
    """Create a project; prints its per-job webhook secret once."""
    from service.projects import ProjectNameTaken, create_project

    try:
        with load_services().db.transaction() as session:
            project = create_project(session, name)
    except ProjectNameTaken:
        raise click.ClickException(f"a project named {name!r} already exists") from None
    click.echo(f"project {project.name}: id {project.id}")
    click.echo(f"per-job webhook secret (shown once): {project.secret}")


@projects.command("list")
def projects_list() -> None:
    """List projects: id, name, creation time, own ModelsLab key (masked) if any."""
    from service.projects import list_projects, project_resource

    with load_services().db.transaction() as session:
        for project in list_projects(session):
            row = project_resource(project)
            key = row.get("modelslab_api_key", "-")
            click.echo(f"{row['id']}\t{row['name']}\t{row['created_at']}\t{key}")


@projects.command("set-key")
@click.argument("name")
@click.option(
    "--modelslab-api-key",
    prompt="ModelsLab API key",
    hide_input=True,
    envvar="MOTIONHOOK_PROJECT_MODELSLAB_API_KEY",
    help="The key. Better left out: it is then asked for, hidden (scripts set "
    "MOTIONHOOK_PROJECT_MODELSLAB_API_KEY), so it stays out of shell history and ps.",
)
def projects_set_key(name: str, modelslab_api_key: str) -> None:
    """Give a project its own ModelsLab key: its jobs use that account and its cap."""
    from schemas.projects import ProjectUpdateSchema
    from service.projects import mask_key, set_modelslab_key

    key = modelslab_api_key.strip()
    errors = ProjectUpdateSchema().validate({"modelslab_api_key": key})
    if errors:
        raise click.BadParameter(
            "; ".join(errors["modelslab_api_key"]), param_hint="--modelslab-api-key"
        )
    svc = load_services()
    with svc.db.transaction() as session:
        set_modelslab_key(
            _project_named(session, name, "NAME"), key, svc.settings.modelslab_api_key
        )
    click.echo(f"project {name} now uses its own ModelsLab key {mask_key(key)}")


@projects.command("clear-key")
@click.argument("name")
def projects_clear_key(name: str) -> None:
    """Take a project's own ModelsLab key away: it goes back to the instance's key."""
    from service.projects import set_modelslab_key

    svc = load_services()
    with svc.db.transaction() as session:
        set_modelslab_key(
            _project_named(session, name, "NAME"), None, svc.settings.modelslab_api_key
        )
    click.echo(f"project {name} now uses the instance's ModelsLab key")


@main.group()
def tokens() -> None:
    """API tokens of a project, stored hashed: create (shown once), list, revoke."""


def _project_named(session: Session, name: str, param_hint: str = "--project") -> Project:
    """The project called ``name``, or a usage error naming it."""
    from service.projects import find_project

    project = find_project(session, name)
    if project is None:
        raise click.BadParameter(f"no project named {name!r}", param_hint=param_hint)
    return project


@tokens.command("create")
@click.option("--project", "project_name", required=True, help="Name of the project.")
@click.option("--scope", required=True, type=SCOPE_CHOICE, help="read, write or admin.")
@click.option("--description", default="", help="What the token is for.")
def tokens_create(project_name: str, scope: str, description: str) -> None:
    """Issue a token; it is printed once and stored only as a hash."""
    from service.projects import create_token

    with load_services().db.transaction() as session:
        token, value = create_token(
            session, _project_named(session, project_name), scope, description
        )
    click.echo(f"token {token.id} ({scope}) of project {project_name}, shown once:", err=True)
    click.echo(value)


@tokens.command("list")
@click.option("--project", "project_name", required=True, help="Name of the project.")
def tokens_list(project_name: str) -> None:
    """List a project's tokens: id, scope, creation time, description (never the values)."""
    from service.projects import list_tokens, token_resource

    with load_services().db.transaction() as session:
        for token in list_tokens(session, _project_named(session, project_name)):
            row = token_resource(token)
            click.echo(f"{row['id']}\t{row['scope']}\t{row['created_at']}\t{row['description']}")


@tokens.command("revoke")
@click.argument("token_id")
@click.option("--project", "project_name", required=True, help="Name of the project.")
def tokens_revoke(token_id: str, project_name: str) -> None:
    """Revoke a token; it stops working at once."""
    from service.projects import revoke_token

    with load_services().db.transaction() as session:
        revoked = revoke_token(session, _project_named(session, project_name), token_id)
    if not revoked:
        raise click.ClickException(f"project {project_name} has no token {token_id}")
    click.echo(f"revoked {token_id}")


if __name__ == "__main__":
    main()
