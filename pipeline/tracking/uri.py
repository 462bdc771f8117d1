"""Where MLflow tracks: the tracking URI (flag, environment, config, default) and its checks.

MLflow >= 3.13 refuses its ``./mlruns`` file store, so only database and server URIs are accepted;
SQLite paths are made absolute because Ray workers change their working directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """Misconfigured tracking; the message says what to do."""


def _scheme(uri: str) -> str:
    """The URI's scheme, lower case ('' when it has none)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    return m.group(1).lower() if m else ""


def validate_uri(uri: str, source: str) -> str:
    """``uri`` checked (no file store) and, for SQLite, made absolute with its directory created."""
    uri = uri.strip()
    scheme = _scheme(uri)
    base = scheme.split("+", 1)[0]
    if scheme == "file" or not scheme:
        raise TrackingError(
            f"tracking URI {uri!r} (from {source}) points at MLflow's file store (a directory), "
            "which MLflow >= 3.13 refuses. Use a database, e.g. "
            "'sqlite:////absolute/path/mlflow.db', or a tracking server 'http://host:5000'. "
            "Existing ./mlruns data can be migrated with 'mlflow migrate-filestore'."
        )
    if base == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            db, _, query = path.partition("?")
            absolute = Path(db).expanduser().resolve()
            if str(absolute) != db:
                # Ray workers chdir into session dirs: a relative DB path would differ per process
                uri = f"{scheme}:///{absolute}" + (f"?{query}" if query else "")
                log.info("tracking URI made absolute: %s", uri)
            parent = absolute.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingError(
                    f"cannot create the directory {parent} for the MLflow database {uri!r} "
                    f"(from {source}): {e}. Choose a writable location with --tracking-uri."
                ) from e
    return uri


def resolve_tracking_uri(
    cli_uri: str | None, cfg_uri: str | None, run_root_local: Path | None
) -> str:
    """The tracking URI to use.

    Precedence: ``--tracking-uri``, ``MLFLOW_TRACKING_URI``, config ``tracking.uri``, then
    ``sqlite:///<run_root>/mlflow.db`` (or ``sqlite:///<cwd>/mlflow.db`` when the run root is
    remote). ``file:`` URIs and plain directories are rejected (MLflow's file store).
    """
    for value, source in (
        (cli_uri, "--tracking-uri"),
        (os.environ.get("MLFLOW_TRACKING_URI"), "the MLFLOW_TRACKING_URI environment variable"),
        (cfg_uri, "config tracking.uri"),
    ):
        if value:
            return validate_uri(str(value), source)
    base = Path(run_root_local) if run_root_local is not None else Path.cwd()
    db = base.expanduser().resolve() / "mlflow.db"
    return validate_uri(f"sqlite:///{db}", "the default (run root)")


def tracking_uri_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` cannot be used (None when it answers or is not a server).

    A GET of ``<uri>/health`` with a short timeout; any HTTP answer counts as reachable. Without it,
    MLflow retries an unreachable server silently for minutes."""
    import socket
    import urllib.error
    import urllib.request

    if _scheme(uri) not in ("http", "https"):
        return None
    url = uri.split("?", 1)[0].rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (an auth proxy, an old server without /health): reachable
    except (urllib.error.URLError, socket.timeout, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return (f"the MLflow tracking server {uri} is unreachable ({reason}; waited up to {timeout:g} s): "
                "start it, fix --tracking-uri / tracking.uri / MLFLOW_TRACKING_URI, or leave them out "
                "to track into SQLite under the run")


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``<dir of the sqlite db>/mlartifacts/<experiment>`` for SQLite; None otherwise."""
    if _scheme(tracking_uri).split("+", 1)[0] != "sqlite" or not tracking_uri.startswith(
        "sqlite:///"
    ):
        return None
    path = tracking_uri[len("sqlite:///"):].partition("?")[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", experiment).strip("._") or "default"
    return (Path(path).expanduser().resolve().parent / "mlartifacts" / safe).as_uri()


def create_sqlite_store(uri: str) -> None:
    """Create a new SQLite tracking database whole or not at all: MLflow creates and migrates it under a temporary
    name, which is then linked to the real one. A full disk mid-migration used to leave a half-made database that
    every later run refused ("table _alembic_tmp_... already exists"). Other URIs and existing files: nothing."""
    if _scheme(uri) != "sqlite" or not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates and migrates
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
