"""Command line of the pipeline: validate the config, start Ray and MLflow, run the DAG, summarize."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from ..config.loading import ConfigError, available_configs, dump_yaml, load_config
from ..stages.table import STAGES
from .launch import (
    LaunchError,
    interrupted_exit_code,
    log_summary,
    preflight,
    quiet_output,
    report_failure,
    start_ray,
    stop_cleanly_on_sigterm,
    tracking_uri,
    use_ray,
)

__all__ = ["main", "parse_args", "resolve_config", "summary_lines"]


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
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray; "
                             "'auto': the cluster `ray start` made on this machine)")
    parser.add_argument("--in-process", action="store_true", help="run every stage in this process, without Ray")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--register-model", default=None, metavar="NAME",
                        help="register the compressed model (logged to MLflow as a pyfunc) under NAME in the model registry")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own output (always in Ray's log files)")
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
    if problems:
        print(f"error: {problems[0]}" if len(problems) == 1 else
              "error: the configuration does not fit this machine:\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)
        return 2
    from .launch import locked_store

    stop_cleanly_on_sigterm()
    try:
        with locked_store(cfg) as store:
            return _run(cfg, args, store)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # before the run started: nothing to resume yet
        return interrupted_exit_code(err)


def _run(cfg, args: argparse.Namespace, store) -> int:
    """Start MLflow and Ray, run the DAG, print the summary; a failure is one line (see launch.report_failure)."""
    from .. import console
    from ..stages.dag import Pipeline
    from ..tracking.runs import parent_run

    ray_on = use_ray(cfg)
    started = time.perf_counter()
    quiet_output(args.verbose)
    print(f"penni pipeline '{cfg.name}' -> {store.root}  ({'Ray' if ray_on else 'in-process'})", flush=True)
    try:
        with parent_run(cfg, tracking_uri(cfg, args.tracking_uri, store), store, config_name=config_label(args)) as tracker:
            if ray_on:
                start_ray(cfg, verbose=args.verbose)
            with console.session(STAGES, use_ray=ray_on) as display:
                outcomes = Pipeline(cfg, use_ray=ray_on, tracker=tracker, log=display.dag_line).run()
            if tracker is not None:
                log_summary(tracker, store)
                _log_model(tracker, store, cfg, args.register_model)
    except KeyboardInterrupt as err:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return interrupted_exit_code(err)
    except Exception as err:  # noqa: BLE001 - report and exit non-zero
        report_failure(err, store, debug=args.debug)
        return 1
    print("\n".join(summary_lines(outcomes, store, tracker, time.perf_counter() - started)))
    return 0


def _log_model(tracker, store, cfg, register_as: str | None) -> None:
    """Log the compressed model to MLflow; a failure only warns, unless the user asked to register it."""
    from ..tracking.logged_model import log_compressed_model

    try:
        log_compressed_model(tracker, store, cfg, register_as)
    except Exception as err:
        if register_as is not None:
            raise
        print(f"warning: the compressed model was not logged to MLflow ({type(err).__name__}: {err}); "
              "it is in the run's evaluate stage", file=sys.stderr)


def config_label(args: argparse.Namespace) -> str:
    """What the ``penni.config`` tag holds: the shipped config's name or the YAML file's stem."""
    return os.path.splitext(os.path.basename(args.config))[0] if args.config else "quickstart"


def summary_lines(outcomes, store, tracker, seconds: float) -> list[str]:
    """The closing lines: baseline vs compressed (the full table is the report's summary.md), then where
    things are (the stages' own lines came before)."""
    lines = []  # no blank line: the default run stays within 40 lines in a log
    report = store.local_path("report")
    if report is not None and (report / "evaluation.json").exists():
        lines += comparison_lines(json.loads((report / "evaluation.json").read_text()))
    lines.append(f"Report: {store.stage_uri('report')}  (summary.md, structure.md, coefficients.png, "
                 "reconstructed_weights.png, learning_curves.png)")
    if tracker is not None:
        lines += tracker.ui_lines()  # how to open the runs table
    ran = sum(o.status == "ran" for o in outcomes)
    lines.append(f"Total wall time: {seconds:.1f}s ({ran} stage(s) ran, {len(outcomes) - ran} skipped)")
    return lines


def comparison_lines(evaluation: dict) -> list[str]:
    """Baseline vs compressed as a Markdown table: test top-1, size, MACs, latency per batch size."""
    s, b, c = evaluation["summary"], evaluation["models"]["baseline"], evaluation["models"]["compressed"]
    threads = f", {s['torch_threads']} threads" if "torch_threads" in s else ""
    rows = [(f"Baseline vs compressed (test split; latency on {s.get('device', '?')}{threads})", "baseline", "compressed", "change"),
            ("---", "---:", "---:", "---:"),
            ("test top-1 %", f"{100 * b['test_top1']:.2f}", f"{100 * c['test_top1']:.2f}",
             f"{-s['top1_drop_points']:+.2f} pt"),
            ("parameters", f"{b['params']:,}", f"{c['params']:,}", f"-{s['params_reduction_pct']:.1f}%"),
            ("MACs, sparse (paper rule)", f"{b['sparse_macs']:,}", f"{c['sparse_macs']:,}",
             f"-{s['sparse_macs_reduction_pct']:.1f}%"),
            ("MACs, dense-executable", f"{b['dense_macs']:,}", f"{c['dense_macs']:,}",
             f"-{s['dense_macs_reduction_pct']:.1f}%")]
    sizes = sorted(int(k.removeprefix("latency_ms_bs")) for k in b if k.startswith("latency_ms_bs"))
    rows += [_latency_row(s, b, c, bs) for bs in sizes]
    return ["| " + " | ".join(row) + " |" for row in rows]


def _latency_row(s: dict, b: dict, c: dict, bs: int) -> tuple[str, str, str, str]:
    """One batch size's latency: PyTorch (and ONNX Runtime where measured) in one row."""
    mode = c.get(f"latency_mode_bs{bs}")
    cells = [f"{b[f'latency_ms_bs{bs}']:.2f}", f"{c[f'latency_ms_bs{bs}']:.2f}" + (f" ({mode})" if mode else ""),
             f"{s[f'latency_speedup_bs{bs}']:.2f}x"]
    name = f"latency ms, batch {bs}"
    if f"ort_latency_ms_bs{bs}" in c and f"ort_latency_speedup_bs{bs}" in s:
        name += " (PyTorch / ONNX Runtime)"
        cells = [cells[0] + f" / {b[f'ort_latency_ms_bs{bs}']:.2f}", cells[1] + f" / {c[f'ort_latency_ms_bs{bs}']:.2f}",
                 cells[2] + f" / {s[f'ort_latency_speedup_bs{bs}']:.2f}x"]
    return (name, *cells)
