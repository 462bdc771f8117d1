"""The one error type for user-facing data problems, and finding it inside Ray's wrappers."""

from __future__ import annotations

__all__ = ["DataError", "find_data_error"]


class DataError(ValueError):
    """A user-facing data problem: the message says what was wrong and what to do."""


def find_data_error(err: BaseException | None) -> DataError | None:
    """The DataError behind ``err``, also when Ray wrapped it (a task error's ``cause``, a Ray
    Train ``WorkerGroupError``'s ``worker_failures``, chained exceptions); None if there is none."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            inner = getattr(e, "cause", None)  # a RayTaskError(DataError): its cause reads cleanly
            return inner if isinstance(inner, DataError) else e
        failures = getattr(e, "worker_failures", None)
        todo += list(failures.values()) if isinstance(failures, dict) else []
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
