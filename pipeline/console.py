"""What the user sees while a run works: one line per epoch and stage, a progress bar, warnings.

Training and stage code (in-process, in a Ray task, or rank 0 of a Ray Train worker group) calls
``report_epoch``, ``report_batches`` and ``report_line``; the driver shows them once. On the
driver, ``session()`` opens the ``Display``: in-process calls reach it directly; calls from Ray
processes go to a named actor (``ConsoleSink``) that a driver thread drains. Without a session
(library use, a bare Ray worker) the calls print plain lines.

When stdout is a terminal the display keeps a tqdm bar per stage (stage k/n, epoch, images/s,
ETA) under the lines; otherwise it writes plain lines only (logs, pipes, CI).
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

SINK_NAME = "penni-console"
_BATCH_INTERVAL_S = 0.5  # a Ray worker sends at most this often a progress update
_REFRESH_S = 0.1         # the bar is redrawn at most this often
_BAR_WITH_TOTAL = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"
_DAG_LINE = re.compile(r"^\[(?P<stage>[\w.-]+)\] (?P<rest>.*)$", re.S)

_display: "Display | None" = None  # set in the driver process while a session is open
_sink_handle: Any = None           # this Ray process's handle on the driver's sink (cached)
_last_batches_sent = 0.0


# ------------------------------------------------------------------ the reporting seam


def report_epoch(stage: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    """One finished epoch (``epoch`` counts from 0) of ``stage``: shown as one line on the driver."""
    _emit("epoch", stage, int(epoch), int(epochs), _plain(metrics))


def report_batches(stage: str, epoch: int, epochs: int, done: int, total: int, images: int, seconds: float) -> None:
    """Progress inside an epoch: ``done`` of ``total`` batches, ``images`` seen in ``seconds``."""
    global _last_batches_sent
    if _display is None:  # from a Ray process: rate-limited, the last batch always goes
        now = time.monotonic()
        if done < total and now - _last_batches_sent < _BATCH_INTERVAL_S:
            return
        _last_batches_sent = now
    _emit("batches", stage, int(epoch), int(epochs), int(done), int(total), int(images), float(seconds))


def report_line(text: str) -> None:
    """A warning or note from training code (e.g. a discarded checkpoint), shown once on the driver."""
    _emit("line", str(text))


_notes_sent: set[str] = set()  # this process's notes (report_note), each sent once


def report_note(text: str) -> None:
    """A note every training process may make alike (e.g. the augmentation chosen): shown once per session."""
    if text in _notes_sent:
        return
    _notes_sent.add(text)
    _emit("note", str(text))


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers and short strings of ``metrics`` (what the epoch line shows; cheap to send)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _emit(kind: str, *args: Any) -> None:
    display = _display
    if display is not None:
        display.handle(kind, args)
    elif not _send_to_driver(kind, args):
        Display(stages=(), tty=False).handle(kind, args)  # no session: this process's own output


def _send_to_driver(kind: str, args: tuple) -> bool:
    """Hand a report to the driver's open session (True), from a Ray process of its job."""
    sink = _sink()
    if sink is None:
        return False
    import ray

    ref = sink.put.remote(kind, args)
    if kind == "batches":  # progress is best effort
        return True
    try:
        return ray.get(ref, timeout=30)  # waited for: lines arrive before the stage's end is reported
    except Exception:  # noqa: BLE001 - the driver (and its sink) is gone
        global _sink_handle
        _sink_handle = None
        return False


def _sink():
    """The ``ConsoleSink`` of this Ray job's driver, if it made one (the handle is cached)."""
    global _sink_handle
    if _sink_handle is not None or "ray" not in sys.modules:
        return _sink_handle
    import ray

    if not ray.is_initialized():
        return None
    try:
        _sink_handle = ray.get_actor(SINK_NAME)
    except ValueError:  # this job's driver has no console
        return None
    return _sink_handle


class ConsoleSink:
    """A Ray actor holding reports from Ray processes, in order, until the driver drains them. It lives
    as long as the driver's Ray job; between the driver's sessions it refuses reports."""

    def __init__(self) -> None:
        self._events: list[tuple[str, tuple]] = []
        self._open = False

    def open(self) -> None:
        self._events, self._open = [], True

    def put(self, kind: str, args: tuple) -> bool:
        """Keep a report while a session is open; False tells the sender to show it itself."""
        if self._open:
            self._events.append((kind, args))
        return self._open

    def drain(self, close: bool = False) -> list[tuple[str, tuple]]:
        events, self._events = self._events, []
        self._open = self._open and not close
        return events


# ------------------------------------------------------------------ the driver's display


class Display:
    """Shows reports: plain lines, plus a tqdm bar per stage when ``tty`` (stdout is a terminal)."""

    def __init__(self, stages: Sequence[str], tty: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.stages = list(stages)
        self._bar = None
        self._bar_stage: str | None = None
        self._lock = threading.RLock()
        self._last_refresh = 0.0
        self.flush_reports: Callable[[], None] = lambda: None  # the session pulls pending Ray reports
        self._notes: set[str] = set()

    def handle(self, kind: str, args: tuple) -> None:
        """One report (``kind`` is ``epoch``, ``batches``, ``line`` or ``note``), under the display's lock."""
        with self._lock:
            getattr(self, kind)(*args)

    def position(self, stage: str) -> str:
        """``stage k/n`` for a stage of the pipeline, ``stage`` otherwise."""
        if stage in self.stages:
            return f"stage {self.stages.index(stage) + 1}/{len(self.stages)}"
        return "stage"

    def epoch(self, stage: str, epoch: int, epochs: int, metrics: dict) -> None:
        self.write(format_epoch(stage, epoch, epochs, metrics))

    def batches(self, stage: str, epoch: int, epochs: int, done: int, total: int, images: int,
                seconds: float) -> None:
        now = time.monotonic()
        if not self.tty or total <= 0 or (done < total and now - self._last_refresh < _REFRESH_S):
            return
        self._last_refresh = now
        bar = self._open_bar(stage)
        bar.bar_format = _BAR_WITH_TOTAL
        bar.total = max(epochs, 1) * total
        bar.n = min(epoch * total + done, bar.total)
        rate = images / seconds if seconds > 0 else 0.0
        left_batches = bar.total - bar.n
        eta = left_batches * (seconds / done) if done else None
        bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}, {rate:,.0f} img/s"
                            + (f", ETA {_clock(eta)}" if eta is not None else ""), refresh=False)
        bar.refresh()

    def line(self, text: str) -> None:
        self.write(text)

    def note(self, text: str) -> None:
        """A ``report_note``: the first time it reaches this display."""
        if text not in self._notes:
            self._notes.add(text)
            self.write(text)

    def dag_line(self, text: str) -> None:
        """A line of the stage runner (``Pipeline(log=...)``): stage starts open the bar, ends print one line."""
        self.flush_reports()  # what Ray processes reported comes before the stage's end (outside our lock)
        with self._lock:
            match = _DAG_LINE.match(text)
            if text.startswith("plan: "):
                return  # every stage reports its own line
            if match is None:
                self.write(text)
                return
            stage, rest = match["stage"], match["rest"]
            if rest.startswith("running"):
                if self.tty:
                    self._open_bar(stage)
                if "retry" in rest:
                    self.write(text)
                return
            if rest.startswith(("done", "up to date")):
                self._close_bar()
                text = f"{text} ({self.position(stage)})" if stage in self.stages else text
            self.write(text)

    def write(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def _open_bar(self, stage: str):
        if self._bar is not None and self._bar_stage == stage:
            return self._bar
        self._close_bar()
        from tqdm import tqdm

        self._bar = tqdm(total=None, desc=f"{self.position(stage)} {stage}", file=self.stream, leave=False,
                         dynamic_ncols=True, bar_format="{desc}: {elapsed}{postfix}")
        self._bar_stage = stage
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_stage = None, None

    def close(self) -> None:
        with self._lock:
            self._close_bar()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------ the driver's session


class _Pump:
    """Drains the driver's ``ConsoleSink`` actor into the display: from a thread, and on demand."""

    def __init__(self, display: Display, interval: float = 0.25) -> None:
        import ray

        self.display = display
        self.interval = interval
        self.sink = ray.remote(ConsoleSink).options(
            name=SINK_NAME, get_if_exists=True, num_cpus=0, max_restarts=0).remote()
        ray.get(self.sink.open.remote(), timeout=120)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="penni-console", daemon=True)
        self._thread.start()

    def drain(self, close: bool = False) -> None:
        import ray

        with self._lock:
            try:
                events = ray.get(self.sink.drain.remote(close), timeout=30)
            except Exception:  # noqa: BLE001 - Ray is shutting down: reports are best effort
                return
            for kind, args in events:
                self.display.handle(kind, args)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()

    def stop(self) -> None:
        """Show what is left; from now on Ray processes show their reports themselves."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.drain(close=True)


@contextlib.contextmanager
def session(stages: Sequence[str], *, use_ray: bool, tty: bool | None = None) -> Iterator[Display]:
    """The driver's display for one run; with ``use_ray`` (Ray started), reports from Ray processes
    reach it through the ``ConsoleSink`` actor. Yields the display (``dag_line`` is the stage log)."""
    global _display
    display = Display(stages, tty=tty)
    pump = _Pump(display) if use_ray else None
    if pump is not None:
        display.flush_reports = pump.drain  # type: ignore[assignment]
    previous, _display = _display, display
    try:
        yield display
    finally:
        if pump is not None:
            pump.stop()
        display.close()
        _display = previous


def format_epoch(stage: str, epoch: int, epochs: int, m: dict[str, float]) -> str:
    """One progress line per epoch."""
    parts = [f"[{stage}] epoch {epoch + 1}/{epochs}"]
    if "phase" in m:
        parts.append(f"learn={m['phase']}")
    for key, fmt in (("train_loss", "loss {:.4f}"), ("train_top1", "train {:.2%}"), ("val_top1", "val {:.2%}"),
                     ("sparsity", "sparsity {:.1%}"), ("lr", "lr {:.4g}"), ("epoch_seconds", "{:.1f}s")):
        value = m.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(fmt.format(value))
    return "  ".join(parts)
