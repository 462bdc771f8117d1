"""The one error type for user-facing data problems, and the one walk that finds the real error
inside Ray's wrappers (a task error's ``cause``, a Ray Train ``WorkerGroupError``'s
``worker_failures``) and Python's chained exceptions."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["DataError", "causes", "find_cause", "find_data_error", "innermost", "wrapped_errors"]


class DataError(ValueError):
    """A user-facing data problem: the message says what was wrong and what to do."""


def wrapped_errors(err: BaseException) -> list[BaseException]:
    """The errors Ray wrapped directly in ``err``: a Ray Train ``WorkerGroupError``'s
    ``worker_failures`` (in the order of the mapping, by rank), then a ``RayTaskError``'s ``cause``."""
    failures = getattr(err, "worker_failures", None)
    inner = list(failures.values()) if isinstance(failures, dict) else []
    cause = getattr(err, "cause", None)
    inner.append(cause)
    return [e for e in inner if isinstance(e, BaseException)]


def causes(err: BaseException | None, *, chained: bool = True,
           depth: int | None = None) -> Iterator[BaseException]:
    """``err`` and the errors behind it, nearest first (breadth-first), each once: what Ray wrapped
    (``wrapped_errors``) and, when ``chained``, ``__cause__`` and ``__context__``. ``depth`` bounds
    how many steps in from ``err`` the walk goes (None: all the way)."""
    todo: list[tuple[BaseException | None, int]] = [(err, 0)]
    seen: set[int] = set()
    while todo:
        e, level = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if depth is not None and level >= depth:
            continue
        inner: list[BaseException | None] = list(wrapped_errors(e))
        if chained:
            inner += [e.__cause__, e.__context__]
        todo += [(i, level + 1) for i in inner]


def find_cause(err: BaseException | None, types: type | tuple[type, ...], *,
               chained: bool = True, depth: int | None = None) -> BaseException | None:
    """The first error of ``types`` in ``causes(err)``; None if there is none. A ``RayTaskError``
    wrapping such an error is itself an instance of its type: its ``cause`` (which reads cleanly)
    is returned instead."""
    for e in causes(err, chained=chained, depth=depth):
        if isinstance(e, types):
            inner = getattr(e, "cause", None)
            return inner if isinstance(inner, types) else e
    return None


def innermost(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers: the first wrapped error (a worker group's first
    failure, else a task error's cause), followed in until nothing is wrapped."""
    seen = {id(err)}
    while (inner := wrapped_errors(err)) and id(inner[0]) not in seen:
        err = inner[0]
        seen.add(id(err))
    return err


def find_data_error(err: BaseException | None) -> DataError | None:
    """The DataError behind ``err``, also when Ray wrapped it; None if there is none."""
    found = find_cause(err, DataError)
    return found if isinstance(found, DataError) else None
