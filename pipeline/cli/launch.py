"""The launch steps the pipeline command and the sweep share: checks before anything starts, a
quiet Ray start, the run's storage and lock, the MLflow tracking URI, and a failure as one line."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # on the PYTHONPATH of Ray workers (not a job's working_dir)
_QUIET_LOGGERS = ("mlflow", "alembic")               # INFO lines on every start (database set-up)


class LaunchError(RuntimeError):
    """The run cannot start (storage, lock): one line saying what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes, Slurm and systemd send), raised like Ctrl-C so that the same clean-up runs."""


def stop_cleanly_on_sigterm() -> None:
    """From now on SIGTERM interrupts the main thread as SIGINT does: checkpoints are never published half-written,
    MLflow runs end as KILLED and the lock is released. Ray's own handler (installed by ``ray.init``) exits
    mid-call instead, which aborted the driver."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_SIGTERM_RECEIVED: list[bool] = []  # set by the handler: code that re-raises a plain KeyboardInterrupt loses the type
_DEFERRED: list[bool] = []
# Libraries whose state an exception raised in the middle of a call leaves half-done (an open SQLite cursor that
# SQLAlchemy then fails to close, with a traceback): SIGTERM waits until the call has returned.
UNINTERRUPTIBLE = ("sqlalchemy", "mlflow", "alembic", "sqlite3")
DEFER_STEP_S, DEFER_MAX = 0.05, 200  # re-check every 50 ms, for at most 10 s


def _inside_uninterruptible(frame: Any) -> bool:
    """Whether the interrupted code runs inside one of ``UNINTERRUPTIBLE`` (any frame of its stack)."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in UNINTERRUPTIBLE:
            return True
        frame = frame.f_back
    return False


def _raise_terminated(signum: int, frame: Any) -> None:
    import signal
    import threading

    if _inside_uninterruptible(frame) and len(_DEFERRED) < DEFER_MAX:
        _DEFERRED.append(True)  # deliver it again shortly, once the database call has returned
        main = threading.main_thread().ident  # to the main thread itself, so that a blocking call there wakes up
        threading.Timer(DEFER_STEP_S, signal.pthread_kill, (main, signal.SIGTERM)).start()
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one request is enough: let the clean-up finish
    _SIGTERM_RECEIVED.append(True)
    raise Terminated()


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal's number: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""
    return 143 if isinstance(err, Terminated) or _SIGTERM_RECEIVED else 130


# ------------------------------------------------------------------ checks before anything starts


def preflight(cfg, tracking_uri: str | None = None) -> list[str]:
    """Checks against this machine before anything starts (nothing is written): the model can be
    built, the files the config names exist, the storage is a writable directory, the dataset is
    there with ``model.num_classes`` classes and decodable images, training sees a batch, and the
    tracking server answers. Returns the problems found, one line each."""
    from ..storage.run_store import storage_problem

    problems = []  # the cheap checks first: when they fail, torch is not even imported
    for key, value in (("model.weights", cfg.model.weights), ("baseline.checkpoint", cfg.baseline.checkpoint)):
        if value and "://" not in value and not Path(value).expanduser().is_file():
            problems.append(f"{key}: file {value!r} does not exist")
    problems += filter(None, [_data_root_problem(cfg.data), storage_problem(cfg.storage),
                              _tracking_problem(cfg, tracking_uri)])
    if problems:
        return problems
    return _model_problems(cfg) + _data_problems(cfg)


def _data_root_problem(data_cfg) -> str | None:
    """A missing local ``data.root`` of an image dataset, found with the other missing paths (one line each)."""
    root = data_cfg.root
    if data_cfg.dataset not in ("imagefolder", "parquet") or not root or "://" in str(root):
        return None
    if Path(root).expanduser().is_dir():
        return None
    hint = ("write shards with `python workflows/make_shards.py IMAGEFOLDER_ROOT OUT_DIR`"
            if data_cfg.dataset == "parquet" else "point it at a tree with train/ and val/")
    return f"data.root: directory {str(root)!r} does not exist ({hint})"


def _model_problems(cfg) -> list[str]:
    try:
        import torch

        from penni.models import build_model

        with torch.device("meta"):
            build_model(cfg.model.arch, num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels,
                        **cfg.model.kwargs)
    except (ValueError, TypeError) as err:
        return [f"model: {err}"]
    return []


def _data_problems(cfg) -> list[str]:
    """The dataset exists, matches the model and gives every training worker a batch."""
    from ..data.checks import check_dataset
    from ..data.loaders import build_datasets
    from ..errors import DataError
    from ..stages.table import TRAINING_STAGES
    from ..training.loop import check_trainable

    try:
        check_dataset(cfg.data, cfg.model.num_classes)
        check_trainable(cfg, build_datasets(cfg.data, cfg.seed), TRAINING_STAGES)
    except (DataError, ValueError) as err:
        return [f"data: {err}"]
    return []


def _tracking_problem(cfg, cli_uri: str | None) -> str | None:
    """An unreachable MLflow tracking server, found with a 5 s probe (not minutes of MLflow retries)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if not uri or importlib.util.find_spec("mlflow") is None:
        return None
    from ..tracking.uri import tracking_uri_problem

    problem = tracking_uri_problem(str(uri))
    return f"tracking: {problem}" if problem else None


# ------------------------------------------------------------------ Ray


def use_ray(cfg) -> bool:
    """Whether the stages run on Ray: not with ``ray.in_process``, nor where Ray is not installed."""
    if cfg.ray.in_process:
        return False
    if importlib.util.find_spec("ray") is None:
        print("Ray is not installed: running every stage in-process (pip install 'ray[default,train,tune]==2.60.0')")
        return False
    return True


def ray_address(cfg) -> str:
    """``ray.address``, else RAY_ADDRESS (set for ``ray job submit`` drivers), else a new local Ray:
    never an unrelated Ray that happens to run on this machine ('auto' asks for that one)."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"


def start_ray(cfg, *, verbose: bool = False) -> None:
    """Start (or attach to) Ray. Quiet unless ``verbose``: the output of Ray's processes stays in
    their log files (``/tmp/ray/session_latest/logs``), and only Ray errors reach this console."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                # Ray Train polls its workers every 2 s by default: on short CPU stages that is most of the time
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    # Under `ray job submit`, Ray merges the job's runtime_env into ours and refuses any env var set in
    # both (even to the same value): leave those to the job.
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_env}}
    address = ray_address(cfg)
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.ERROR,
             **({"include_dashboard": None} if address == "local" else {}))
    stop_cleanly_on_sigterm()  # after ray.init, which installs its own handler


def quiet_output(verbose: bool) -> None:
    """Unless ``verbose``: no MLflow INFO lines (database set-up on every start; MLFLOW_LOGGING_LEVEL
    wins), and no PyTorch notice that sparse CSR tensors are beta (the sparse inference forms that
    evaluate times use them)."""
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")  # read by mlflow's import
    if "mlflow" in sys.modules:  # already imported (and configured) in this process
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(level.upper())
    if not verbose:
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


# ------------------------------------------------------------------ storage, lock, tracking


@contextlib.contextmanager
def locked_store(cfg) -> Iterator[Any]:
    """The run's ``RunStore``, holding its lock (taken before anything is written, MLflow included)."""
    from ..storage.lock import RunLock, RunLockedError
    from ..storage.run_store import RunStore, StorageError

    try:
        store = RunStore(cfg.storage, cfg.name)
        lock = RunLock(store).acquire()
    except (StorageError, RunLockedError) as err:
        raise LaunchError(str(err)) from None
    try:
        yield store
    finally:
        lock.release()


def tracking_uri(cfg, cli_uri: str | None, store) -> str | None:
    """The MLflow tracking URI of the run (SQLite beside the stages by default); None when MLflow is missing."""
    if importlib.util.find_spec("mlflow") is None:
        print("MLflow is not installed: tracking is off (pip install 'mlflow>=3.7,<4')")
        return None
    from ..tracking.uri import resolve_tracking_uri

    run_root = Path(store.root) if store.is_local else None
    return resolve_tracking_uri(cli_uri, cfg.tracking.uri, run_root)


def log_summary(tracker, store) -> None:
    """Final metrics and the report files on the parent run (compare runs in the MLflow UI)."""
    report = store.local_path("report")
    manifest = store.read_manifest("evaluate") or {}
    summary = {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, (int, float))}  # names: metric_names.py
    finetuned = (store.read_manifest("finetune") or {}).get("metrics", {})
    if "selected_val_top1" in finetuned:  # the compressed model's validation top-1 (val/top1), as a sweep trial's
        summary["val_top1"] = finetuned["selected_val_top1"]
    tracker.log_parent_metrics(summary)
    if report is not None:
        for path in sorted(report.iterdir()):
            if path.is_file() and path.name != "manifest.json":
                tracker.log_parent_artifact(path)


# ------------------------------------------------------------------ failures


def failure_line(err: BaseException, where: str | None = None) -> str:
    """One line naming what went wrong: data, storage (a full disk at ``where``, the run's storage) and tracking
    problems by their area, other errors by their type; unwraps what Ray wrapped (task causes, Ray Train worker
    failures)."""
    from ..errors import find_data_error, innermost
    from ..storage.run_store import StorageError

    data_err = find_data_error(err)
    if data_err is not None:
        return f"data: {_first_line(data_err)}"
    full = disk_full_line(err, where)
    if full is not None:
        return full
    inner = innermost(err)
    try:
        from ..tracking.uri import TrackingError
    except ImportError:  # pragma: no cover
        TrackingError = ()  # noqa: N806
    if isinstance(inner, StorageError):
        return f"storage: {_first_line(inner)}"
    if isinstance(inner, TrackingError) or type(inner).__module__.startswith(("mlflow", "sqlalchemy")):
        return f"tracking: {type(inner).__name__}: {_first_line(inner)}"
    return f"{type(inner).__name__}: {_first_line(inner)}"


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded", "file too large")


def disk_full_line(err: BaseException, where: str | None = None) -> str | None:
    """``storage: no space left on device at <path>`` when a full disk is behind ``err`` (an OSError, or SQLite's
    "database or disk is full" inside MLflow's SQLAlchemy errors); None otherwise."""
    from ..errors import causes

    for e in causes(err):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            path = e.filename or where
            return f"storage: no space left on device{f' at {path}' if path else ''} ({e.strerror or e}); " \
                   "free space, then re-run the same command to resume"
        text = str(e).lower()
        if any(t in text for t in _FULL_TEXTS):
            at = f" at {where}" if where else (" in the MLflow database" if "database" in text else "")
            return f"storage: no space left on device{at} ({_first_line(e)[:160]}); " \
                   "free space, then re-run the same command to resume"
    return None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def report_failure(err: BaseException, store, *, debug: bool) -> None:
    """The error as one line on stderr; the traceback in ``<run>/logs/error-<time>.log`` (a temp
    file when the run directory is not writable) or on stderr with ``--debug``."""
    text = "".join(traceback.format_exception(err))
    if debug:
        print(text, file=sys.stderr, end="")
    log_path = _write_traceback(text, store)
    where = f"traceback in {log_path}" if log_path else "re-run with --debug for the traceback"
    print(f"error: {failure_line(err, str(store.root) if store is not None else None)}", file=sys.stderr)
    print(f"  ({where}; completed stages are kept: fix the cause and re-run the same command to resume)",
          file=sys.stderr, flush=True)


def _write_traceback(text: str, store) -> Path | None:
    """Where the traceback was written: the run's ``logs/``, else a temp file; None if neither works."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    local = store.local_path("logs") if store is not None and store.is_local else None
    makers = [lambda: local / f"error-{stamp}.log"] if local is not None else []
    makers.append(lambda: Path(tempfile.mkstemp(prefix=f"penni-error-{stamp}-", suffix=".log")[1]))
    for make in makers:
        try:
            path = make()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    return None
