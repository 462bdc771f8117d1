"""Resources of a trial that Tune stopped early go back to the cluster.

When ASHA stops a trial, Tune ends the trial's process, and with it the Ray Train controller it
started; the controller's placement group (its workers' CPUs/GPUs) outlives it until Ray Train's
own cleaner removes it, which needs the State API (it fails where several Ray instances run on one
machine). Without this, the next trial could wait for ever for its workers. So each trial records
the placement group of every Ray Train run it starts, and the driver removes those of a trial that
ended once its process is gone.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback

from ..storage.canonical import json_bytes
from ..storage.fileio import atomic_write_bytes

RECORD_FILE = "sweep_placement_groups.json"
_LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


class RecordPlacementGroup(WorkerGroupCallback):
    """Ray Train callback (runs in the controller): append the worker group's placement group id to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group._worker_group_state.placement_group_handle.placement_group
        atomic_write_bytes(self.path, json_bytes([*_read(self.path), pg.id.hex()]))


class ReleaseEndedTrials(Callback):
    """Tune callback (runs in the driver): a few seconds after a trial ends (finished, stopped or failed),
    remove the placement groups it recorded that still hold resources."""

    def __init__(self, record_paths: dict[int, str], delays_s: tuple[float, ...] = (3.0, 10.0, 30.0)) -> None:
        self.record_paths = record_paths
        self.delays_s = delays_s

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release_later(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release_later(trial)

    def _release_later(self, trial) -> None:
        path = self.record_paths.get(int(trial.config["trial"]))
        if path is not None:
            threading.Thread(target=self._release, args=(path,), daemon=True, name="penni-release").start()

    def _release(self, path: str) -> None:
        for delay in self.delays_s:  # the trial's process (and its controller) end shortly after Tune's decision
            time.sleep(delay)
            for pg_id in _read(path):
                remove_if_live(pg_id)


def remove_if_live(pg_id: str) -> bool:
    """Remove the placement group ``pg_id`` (hex) if it still exists; True when it was removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        state = (ray.util.placement_group_table().get(pg_id) or {}).get("state")
        if state not in _LIVE_STATES:
            return False
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        return True
    except Exception:  # noqa: BLE001 - best effort: Ray may be shutting down
        return False


def _read(path: str) -> list[str]:
    try:
        return list(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return []
