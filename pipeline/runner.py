"""Command line of the pipeline: validate the config, start Ray and MLflow, run the DAG, summarize."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import ConfigError, available_configs, dump_yaml, flatten, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="full_pipeline.py",
        description="PENNI compression pipeline (stages are skipped when their outputs are up to date).")
    parser.add_argument("--config", default=None,
                        help=f"YAML file or a shipped config name ({', '.join(available_configs())}); default quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set retrain.l1=5e-5 (repeatable)")
    parser.add_argument("--run-name", default=None, help="run name (config 'name'): outputs go to <storage>/<run-name>/")
    parser.add_argument("--storage", default=None, help="local directory or pyarrow.fs URI (s3://bucket/prefix)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite under the run)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--in-process", action="store_true", help="run every stage in this process, without Ray")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true",
                        help="on a failure, print the full traceback (otherwise it goes to a log file)")
    return parser.parse_args(list(argv))


def resolve_config(args: argparse.Namespace):
    """Config file + --set overrides + the dedicated flags; validated before anything starts."""
    overrides = list(args.overrides)
    for flag, key in ((args.run_name, "name"), (args.storage, "storage"), (args.address, "ray.address")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if args.in_process:
        overrides.append("ray.in_process=true")
    return load_config(args.config, overrides)


def preflight(cfg, tracking_uri: str | None = None) -> list[str]:
    """Checks against this machine before anything starts (nothing is written): the model can be
    built, the files the config names exist, the storage is a writable directory, the dataset is
    there with ``model.num_classes`` classes and decodable images, training sees a batch, and the
    tracking server answers. Returns the problems found, one line each."""
    from .storage import storage_problem

    problems = []  # the cheap checks first: when they fail, torch is not even imported
    for key, value in (("model.weights", cfg.model.weights), ("baseline.checkpoint", cfg.baseline.checkpoint)):
        if value and "://" not in value and not Path(value).expanduser().is_file():
            problems.append(f"{key}: file {value!r} does not exist")
    problems += filter(None, [storage_problem(cfg.storage), _tracking_problem(cfg, tracking_uri)])
    if problems:
        return problems
    return _model_problems(cfg) + _data_problems(cfg)


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
    from .data import DataError, build_datasets, check_dataset

    try:
        check_dataset(cfg.data, cfg.model.num_classes)
        try:
            from .train import check_trainable
        except ImportError:
            return []
        check_trainable(cfg, build_datasets(cfg.data, cfg.seed))
    except (DataError, ValueError) as err:
        return [f"data: {err}"]
    return []


def _tracking_problem(cfg, cli_uri: str | None) -> str | None:
    """An unreachable MLflow tracking server, found with a 5 s probe (not minutes of MLflow retries)."""
    import importlib.util

    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if not uri or importlib.util.find_spec("mlflow") is None:
        return None
    from .tracking import tracking_uri_problem

    problem = tracking_uri_problem(str(uri))
    return f"tracking: {problem}" if problem else None


def _use_ray(cfg) -> bool:
    if cfg.ray.in_process:
        return False
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray is not installed: running every stage in-process (pip install 'ray[default,train,tune]==2.60.0')")
        return False
    return True


def _start_ray(cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                # Ray Train polls its workers every 2 s by default: on short CPU stages that is most of the time
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    # Under `ray job submit`, Ray merges the job's runtime_env into ours and refuses any env var set in
    # both (even to the same value): leave those to the job.
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_env}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(runtime_env=runtime_env, logging_level=logging.WARNING, include_dashboard=None)


def _tracker(cfg, cli_uri: str | None, store):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("MLflow is not installed: tracking is off (pip install 'mlflow>=3.7,<4')")
        return None
    from .tracking import resolve_tracking_uri

    run_root = Path(store.root) if store.is_local else None  # the SQLite store lives beside the stages
    uri = resolve_tracking_uri(cli_uri, cfg.tracking.uri, run_root)
    return attach_tracker(cfg, uri, store)


def attach_tracker(cfg, tracking_uri: str, store, tags: dict | None = None):
    """The MLflow parent run of this pipeline run: re-attached through ``pipeline.json`` on resume."""
    from .tracking import Tracker

    tracker = Tracker(tracking_uri, cfg.tracking.experiment, cfg.name)
    state = store.read_json("pipeline.json") or {}
    parent = tracker.start_parent(state.get("mlflow_parent_run_id"), flatten(cfg),
                                  tags={"penni.config": cfg.name, **(tags or {})})
    store.write_json_atomic("pipeline.json", {**state, "mlflow_parent_run_id": parent, "tracking_uri": tracking_uri})
    return tracker


def summary_table(outcomes, store, tracker) -> str:
    """The closing table: stages, then baseline vs compressed, then where things are."""
    from .stages import summary_markdown

    lines = ["", "Stages:", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {o.stage} | {o.status} | {o.seconds:.1f} |" for o in outcomes]
    report = store.local_path("report")
    evaluation = None
    if report is not None and (report / "evaluation.json").exists():
        evaluation = json.loads((report / "evaluation.json").read_text())
    if evaluation:
        lines += ["", "Baseline vs compressed (test split):", summary_markdown(evaluation["summary"], evaluation["models"])]
    lines += ["", f"Artifacts: {store.stage_uri('report')}  (structure.md, coefficients.png, "
                  "reconstructed_weights.png, learning_curves.png, summary.md)"]
    if tracker is not None:
        lines += [f"MLflow: {tracker.tracking_uri}  (parent run {tracker.parent_run_id})",
                  f"  open the UI: mlflow ui --backend-store-uri {tracker.tracking_uri}"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"error: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    problems = preflight(cfg, args.tracking_uri)
    if len(problems) == 1:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    if problems:
        print("error: the configuration does not fit this machine:\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)
        return 2
    from .lock import RunLock, RunLockedError
    from .storage import RunStore, StorageError

    try:
        store = RunStore(cfg.storage, cfg.name)
        lock = RunLock(store).acquire()  # before anything is written, the MLflow database included
    except (StorageError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(cfg, args, store)
    finally:
        lock.release()


def _run(cfg, args: argparse.Namespace, store) -> int:
    """Start MLflow and Ray, run the DAG, print the summary; a failure is one line (see _report_failure)."""
    from .dag import Pipeline

    use_ray = _use_ray(cfg)
    started = time.perf_counter()
    print(f"penni pipeline '{cfg.name}' -> {store.root}  ({'Ray' if use_ray else 'in-process'})", flush=True)
    tracker = None
    try:
        tracker = _tracker(cfg, args.tracking_uri, store)
        if use_ray:
            _start_ray(cfg)
        outcomes = Pipeline(cfg, use_ray=use_ray, tracker=tracker).run()
    except KeyboardInterrupt:
        _end_parent(tracker, "KILLED")
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - report and exit non-zero
        _end_parent(tracker, "FAILED")
        _report_failure(err, store, debug=args.debug)
        return 1
    if tracker is not None:
        _log_summary(tracker, store)
        tracker.end_parent("FINISHED")
    print(summary_table(outcomes, store, tracker))
    print(f"\nTotal wall time: {time.perf_counter() - started:.1f}s")
    return 0


def _end_parent(tracker, status: str) -> None:
    """Close the MLflow parent run if possible; a tracking failure must not hide the real error."""
    if tracker is None:
        return
    try:
        tracker.end_parent(status)
    except Exception:  # noqa: BLE001
        logging.getLogger("penni").debug("could not end the MLflow parent run", exc_info=True)


def failure_line(err: BaseException) -> str:
    """One line naming what went wrong: data, storage and tracking problems by their area, other
    errors by their type; unwraps what Ray wrapped (task causes, Ray Train worker failures)."""
    from .data import find_data_error
    from .storage import StorageError

    data_err = find_data_error(err)
    if data_err is not None:
        return f"data: {_first_line(data_err)}"
    inner = _innermost(err)
    try:
        from .tracking import TrackingError
    except ImportError:  # pragma: no cover
        TrackingError = ()  # noqa: N806
    if isinstance(inner, StorageError):
        return f"storage: {_first_line(inner)}"
    if isinstance(inner, TrackingError) or type(inner).__module__.startswith(("mlflow", "sqlalchemy")):
        return f"tracking: {type(inner).__name__}: {_first_line(inner)}"
    return f"{type(inner).__name__}: {_first_line(inner)}"


def _innermost(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (a task error's cause, a worker group's failures)."""
    for _ in range(10):
        failures = getattr(err, "worker_failures", None)
        cause = getattr(err, "cause", None)
        if isinstance(failures, dict) and failures:
            err = next(iter(failures.values()))
        elif isinstance(cause, BaseException):
            err = cause
        else:
            break
    return err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _report_failure(err: BaseException, store, *, debug: bool) -> None:
    """The error as one line on stderr; the traceback in ``<run>/logs/error-<time>.log`` (a temp
    file when the run directory is not writable) or on stderr with ``--debug``."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(err))
    if debug:
        print(text, file=sys.stderr, end="")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = None
    local = store.local_path("logs") if store.is_local else None
    for make in ((lambda: local / f"error-{stamp}.log") if local is not None else None,
                 lambda: Path(tempfile.mkstemp(prefix=f"penni-error-{stamp}-", suffix=".log")[1])):
        if make is None:
            continue
        try:
            path = make()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            log_path = path
            break
        except OSError:
            continue
    where = f"traceback in {log_path}" if log_path else "re-run with --debug for the traceback"
    print(f"error: {failure_line(err)}", file=sys.stderr)
    print(f"  ({where}; completed stages are kept: fix the cause and re-run the same command to resume)",
          file=sys.stderr, flush=True)


def _log_summary(tracker, store) -> None:
    """Final metrics and the report files on the parent run (compare runs in the MLflow UI)."""
    report = store.local_path("report")
    manifest = store.read_manifest("evaluate") or {}
    summary = {k: v for k, v in manifest.get("metrics", {}).items() if "." not in k and isinstance(v, (int, float))}
    tracker.log_parent_metrics(summary)
    if report is not None:
        for path in sorted(report.iterdir()):
            if path.is_file() and path.name != "manifest.json":
                tracker.log_parent_artifact(path)
