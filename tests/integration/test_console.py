"""What a user sees: the tiny pipeline's console output is short, has no Ray noise and no traceback,
and shows every epoch and stage once; reports from Ray processes reach the driver's display once."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import console
from pipeline.stages.table import STAGES

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "workflows" / "full_pipeline.py"
TRAINING = ("baseline", "retrain", "finetune")
BN_NOTE = "BatchNorm statistics re-estimated on "  # the one note a stage may print besides its epochs
RAY_PREFIX = re.compile(r"\((?:\w+ )?pid=\d+")  # "(RayTrainWorker pid=123)", "(pid=123, ip=...)"


def _pipeline_output(tmp_path: Path, *extra: str) -> str:
    """stdout and stderr of the tiny pipeline, merged, through a pipe (not a terminal)."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--storage", str(tmp_path / "runs"),
                           *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=850)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _check_console(out: str) -> None:
    lines = out.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n{out}"
    assert "Traceback" not in out, out
    noise = [line for line in lines if RAY_PREFIX.search(line) or " INFO " in line or "Warning:" in line
             or "WARNING" in line or "Found multiple active Ray instances" in line]
    assert not noise, "\n".join(noise)
    for stage in TRAINING:
        epoch_lines = [line for line in lines if line.startswith(f"[{stage}] epoch 1/1 ")]
        assert len(epoch_lines) == 1, (stage, out)
    for k, stage in enumerate(STAGES, 1):
        stage_lines = [line for line in lines if line.startswith(f"[{stage}] ")
                       and not line.startswith((f"[{stage}] epoch", f"[{stage}] {BN_NOTE}"))]
        assert stage_lines == [stage_lines[0]] and stage_lines[0].endswith(f"(stage {k}/{len(STAGES)})"), \
            (stage, out)
        assert re.fullmatch(rf"\[{stage}\] done in \d+\.\ds \(stage {k}/{len(STAGES)}\)", stage_lines[0]), out
    notes = [line for line in lines if BN_NOTE in line]
    assert [line.split("]")[0] for line in notes] == ["[finetune"], notes  # shrink changed the channels
    assert "Baseline vs compressed (test split" in out and "Total wall time:" in out


def test_ray_run_prints_one_line_per_epoch_and_stage_and_no_ray_output(tiny_ray_run):
    """Another Ray (the test process's) runs on the machine: the run starts its own without a word about it."""
    _check_console(tiny_ray_run[1])


def test_in_process_run_prints_the_same_lines(tmp_path):
    _check_console(_pipeline_output(tmp_path, "--set", "ray.in_process=true"))


def test_reports_from_ray_processes_reach_the_driver_once_and_in_order(local_ray, capsys):
    def report_from_a_ray_task(note: str) -> None:  # nested: Ray ships it by value (tests/ is no package)
        from pipeline import console

        console.report_epoch("retrain", 0, 2, {"train_loss": 1.5, "val_top1": 0.25, "replica_digests": [1, 2]})
        console.report_line(note)

    remote = local_ray.remote(num_cpus=1)(report_from_a_ray_task)
    with console.session(STAGES, use_ray=True, tty=False) as display:
        local_ray.get([remote.remote("note from a task")])
        display.dag_line("[retrain] done in 1.0s")
        console.report_line("note from the driver")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[retrain] epoch 1/2  loss 1.5000  val 25.00%", "note from a task",
                     "[retrain] done in 1.0s (stage 3/8)", "note from the driver"]
    # the session is over (its sink is gone): a Ray process's report falls back to its own output
    assert console._display is None
    local_ray.get([remote.remote("after the session")])


def test_terminal_display_shows_a_progress_bar_per_stage():
    out = io.StringIO()
    display = console.Display(STAGES, tty=True, stream=out)
    display.dag_line("plan: baseline=run")
    display.dag_line("[baseline] running")
    display.handle("batches", ("baseline", 0, 2, 4, 10, 256, 2.0))
    display.handle("epoch", ("baseline", 0, 2, {"train_loss": 1.0}))
    display.dag_line("[baseline] done in 3.0s")
    display.close()
    text = out.getvalue()
    assert "stage 1/8 baseline" in text and "epoch 1/2, 128 img/s, ETA 00:08" in text  # 16 batches at 0.5 s
    assert "[baseline] epoch 1/2  loss 1.0000\n" in text and "[baseline] done in 3.0s (stage 1/8)\n" in text
    assert "plan:" not in text


def test_plain_display_writes_lines_only(capsys):
    display = console.Display(STAGES, tty=False)
    display.dag_line("[decompose] running")
    display.handle("batches", ("retrain", 0, 1, 4, 10, 256, 2.0))
    display.dag_line("[decompose] up to date (manifest matches), skipped")
    display.dag_line("[retrain] failed (RuntimeError: boom); retrying")
    display.dag_line("[retrain] running (retry 1/1)")
    assert capsys.readouterr().out.splitlines() == [
        "[decompose] up to date (manifest matches), skipped (stage 2/8)",
        "[retrain] failed (RuntimeError: boom); retrying", "[retrain] running (retry 1/1)"]


@pytest.mark.parametrize("flags, expected", [([], "local"), (["--address", "auto"], "auto")])
def test_ray_address_is_a_new_local_ray_unless_one_is_named(flags, expected, monkeypatch):
    from pipeline.cli.launch import ray_address
    from pipeline.cli.runner import parse_args, resolve_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = resolve_config(parse_args(["--config", "tiny", *flags]))
    assert ray_address(cfg) == expected
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives its driver
    assert ray_address(cfg) == ("10.0.0.1:6379" if not flags else "auto")
