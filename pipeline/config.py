"""Typed, validated pipeline configuration.

The schema is documented in ``docs/DESIGN.md`` ("Config schema").  Every section is a
dataclass whose defaults are the quickstart run (``workflows/configs/quickstart.yaml``).

Loading goes ``YAML file -> raw dict -> "a.b.c=value" overrides -> typed dataclasses``.
All problems (unknown keys, wrong types, out-of-range values, cross-field rules) are
collected and raised together as one :class:`ConfigError`, one problem per line, each
naming the full dotted key.

Only the standard library and PyYAML are used here: this module is imported by the CLI,
by Ray workers and by tests, none of which should pay for torch / ray / mlflow imports.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Union

import yaml

__all__ = [
    "STAGES",
    "STAGE_DEPENDENCIES",
    "CONFIG_DIR",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "RayConfig",
    "TrackingConfig",
    "TrainConfig",
    "BaselineConfig",
    "DecomposeConfig",
    "RetrainConfig",
    "FinetuneConfig",
    "SweepConfig",
    "PruneConfig",
    "ShrinkConfig",
    "EvaluateConfig",
    "PipelineConfig",
    "load_config",
    "from_dict",
    "apply_overrides",
    "resolve_config_path",
    "available_configs",
    "to_dict",
    "flatten",
    "section_fingerprint",
    "dump_yaml",
]

STAGES: tuple[str, ...] = (
    "baseline",
    "decompose",
    "retrain",
    "prune",
    "finetune",
    "shrink",
    "evaluate",
    "report",
)

#: Config values (dotted keys, sections or single fields) each stage depends on.  The DAG
#: chains the fingerprints of a stage's inputs itself; this is only the config part.
STAGE_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "baseline": ("seed", "model", "data", "baseline", "ray.use_gpu"),
    "decompose": ("decompose",),
    "retrain": ("retrain", "data", "seed"),
    "prune": ("prune", "data.image_size"),  # the channel rule costs MACs at the input size
    "finetune": ("finetune", "data", "seed"),
    "shrink": ("shrink",),
    "evaluate": ("evaluate", "data"),
    "report": (),
}

#: Folder holding the shipped configs; bare names ("fashion_vgg16") resolve here.
CONFIG_DIR: Path = Path(__file__).resolve().parents[1] / "workflows" / "configs"
DEFAULT_CONFIG = "quickstart"


class ConfigError(ValueError):
    """An invalid pipeline configuration.

    ``errors`` holds one message per problem; ``str(exc)`` lists them one per line.
    """

    def __init__(self, errors: Iterable[str] | str, source: str | None = None):
        if isinstance(errors, str):
            errors = [errors]
        self.errors: list[str] = list(errors)
        self.source = source
        where = f" ({source})" if source else ""
        n = len(self.errors)
        head = f"invalid pipeline config{where}: {n} problem{'s' if n != 1 else ''}"
        body = "\n".join(f"  - {e}" for e in self.errors)
        tail = (
            "Fix the value(s) in the YAML file, or override them with "
            "--set key=value (e.g. --set retrain.l1=5e-5)."
        )
        super().__init__(f"{head}\n{body}\n{tail}")


# --------------------------------------------------------------------------------------
# Field checks (used through dataclass field metadata: field(..., metadata=_check(...)))
# --------------------------------------------------------------------------------------

Check = Callable[[Any], Optional[str]]  # returns a problem description or None


def _check(*checks: Check) -> dict:
    return {"checks": checks}


def _gt(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def _ge(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _open(lo: float, hi: float) -> Check:
    return lambda v: None if lo < v < hi else f"must be in the open interval ({lo}, {hi})"


def _closed(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def _half_open(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v < hi else f"must be in [{lo}, {hi})"


def _finite(v: Any) -> str | None:
    if isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    return None


def _each(check: Check) -> Check:
    def run(v: Any) -> str | None:
        for i, item in enumerate(v):
            problem = check(item)
            if problem:
                return f"item {i} ({item!r}) {problem}"
        return None

    return run


def _nonempty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _name_check(v: str) -> str | None:
    if not _NAME_RE.fullmatch(v):
        return "must match [A-Za-z0-9_.-]+ (letters, digits, '_', '.', '-'; no spaces or '/')"
    if v in (".", ".."):
        return "must not be '.' or '..'"
    return None


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    arch: str = field(default="fashion_cnn", metadata=_check(_nonempty))
    num_classes: int = field(default=10, metadata=_check(_ge(1)))
    in_channels: int = field(default=1, metadata=_check(_ge(1)))
    weights: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "imagefolder", "parquet", "synthetic"] = "fashion_mnist"
    root: Optional[str] = None
    train_subset: Optional[int] = field(default=20000, metadata=_check(_ge(1)))
    val_fraction: float = field(default=0.1, metadata=_check(_open(0, 1)))
    val_subset: Optional[int] = field(default=2000, metadata=_check(_ge(1)))
    test_subset: Optional[int] = field(default=None, metadata=_check(_ge(1)))
    batch_size: int = field(default=128, metadata=_check(_ge(1)))
    eval_batch_size: int = field(default=256, metadata=_check(_ge(1)))
    loader_workers: int = field(default=0, metadata=_check(_ge(0)))
    image_size: int = field(default=28, metadata=_check(_ge(1)))
    synthetic_size: int = field(default=1024, metadata=_check(_ge(1)))
    loader: Literal["auto", "torch", "ray_data", "device"] = "auto"
    augment: Literal["auto", "imagenet", "small", "none"] = "auto"
    hflip: bool = True
    normalize: Literal["auto", "imagenet", "dataset", "none"] = "auto"

    def _cross_check(self, prefix: str) -> list[str]:
        errors = []
        if self.dataset in ("imagefolder", "parquet") and not self.root:
            errors.append(
                f"{prefix}root: required when {prefix}dataset is {self.dataset!r}; got "
                f"{self.root!r}. Set it to the dataset directory or URI "
                f"(e.g. --set {prefix}root=/mnt/data/imagenet)."
            )
        return errors


@dataclass
class RayConfig:
    address: Optional[str] = None
    num_workers: int = field(default=2, metadata=_check(_ge(1)))
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=_check(_finite, _gt(0)))
    max_failures: int = field(default=0, metadata=_check(_ge(0)))
    stage_retries: int = field(default=1, metadata=_check(_ge(0)))
    in_process: bool = False


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = field(default="penni", metadata=_check(_nonempty))


@dataclass
class TrainConfig:
    epochs: int = field(default=1, metadata=_check(_ge(0)))
    lr: float = field(default=0.01, metadata=_check(_finite, _gt(0)))
    momentum: float = field(default=0.9, metadata=_check(_half_open(0, 1)))
    weight_decay: float = field(default=5e-4, metadata=_check(_finite, _ge(0)))
    nesterov: bool = True
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[float] = field(
        default_factory=lambda: [0.5, 0.75], metadata=_check(_each(_open(0, 1)))
    )
    gamma: float = field(default=0.1, metadata=_check(_finite, _gt(0)))
    label_smoothing: float = field(default=0.0, metadata=_check(_half_open(0, 1)))
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Union[Literal["auto"], bool] = "auto"

    def _cross_check(self, prefix: str) -> list[str]:
        errors = []
        ms = list(self.milestones)
        if any(b <= a for a, b in zip(ms, ms[1:])):
            errors.append(
                f"{prefix}milestones: must be strictly ascending fractions of the epochs; "
                f"got {ms!r}. Sort them, e.g. [0.5, 0.75]."
            )
        if self.lr_schedule == "multistep" and not ms:
            errors.append(
                f"{prefix}milestones: lr_schedule 'multistep' needs at least one milestone; "
                f"got []. Set e.g. {prefix}milestones=[0.5,0.75] or use lr_schedule=cosine."
            )
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            errors.append(
                f"{prefix}nesterov: true requires momentum > 0 with sgd; got momentum 0. "
                f"Set {prefix}nesterov=false or a momentum such as 0.9."
            )
        return errors


@dataclass
class BaselineConfig(TrainConfig):
    epochs: int = field(default=5, metadata=_check(_ge(0)))
    lr: float = field(default=0.05, metadata=_check(_finite, _gt(0)))
    checkpoint: Optional[str] = None


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = field(default=8, metadata=_check(_ge(0)))
    lr: float = field(default=0.02, metadata=_check(_finite, _gt(0)))
    distill: bool = False  # distil from the retrained (unpruned) model
    distill_temperature: float = field(default=4.0, metadata=_check(_finite, _gt(0)))
    distill_weight: float = field(default=0.5, metadata=_check(_closed(0, 1)))  # KL weight; labels get 1-w


@dataclass
class DecomposeConfig:
    d: Union[int, dict[str, int]] = field(default=5, metadata=_check(lambda v: _d_check(v)))
    exclude: list[str] = field(default_factory=list)


def _d_check(v: Any) -> str | None:
    if isinstance(v, int):
        return None if v >= 1 else "must be >= 1"
    for layer, d in v.items():
        if d < 1:
            return f"entry {layer!r} ({d!r}) must be >= 1"
    return None


@dataclass
class RetrainConfig(TrainConfig):
    epochs: int = field(default=5, metadata=_check(_ge(0)))
    lr: float = field(default=0.02, metadata=_check(_finite, _gt(0)))
    l1: float = field(default=3e-3, metadata=_check(_finite, _ge(0)))
    group_l1: float = field(default=2e-2, metadata=_check(_finite, _ge(0)))
    alternate_every: int = field(default=1, metadata=_check(_ge(1)))
    start_with: Literal["coefficients", "basis", "joint"] = "coefficients"
    include_pointwise: bool = False


@dataclass
class PruneConfig:
    rule: Literal["std", "sparsity", "channels", "channels+std", "channels+sparsity"] = "channels+std"
    s: float = field(default=1.25, metadata=_check(_finite, _gt(0)))
    target: Optional[float] = field(default=None, metadata=_check(_open(0, 1)))
    target_dense_macs_reduction: Optional[float] = field(default=0.7, metadata=_check(_open(0, 1)))
    include_pointwise: bool = False

    def _cross_check(self, prefix: str) -> list[str]:
        problems = []
        if self.rule.endswith("sparsity") and self.target is None:
            problems.append(
                f"{prefix}target: required when {prefix}rule is {self.rule!r}; got null. "
                f"Set a fraction in (0, 1), e.g. --set {prefix}target=0.9."
            )
        if self.rule.startswith("channels") and self.target_dense_macs_reduction is None:
            problems.append(
                f"{prefix}target_dense_macs_reduction: required when {prefix}rule is {self.rule!r}; got null. "
                f"Set the fraction of dense MACs to remove, e.g. --set {prefix}target_dense_macs_reduction=0.6."
            )
        return problems


@dataclass
class ShrinkConfig:
    enabled: bool = True
    round_to: Optional[int] = field(default=None, metadata=_check(_ge(1)))  # kept widths a multiple of this (GPU)


@dataclass
class EvaluateConfig:
    latency_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 64], metadata=_check(_each(_ge(1)))
    )
    latency_repeats: int = field(default=20, metadata=_check(_ge(1)))


@dataclass
class SweepConfig:
    """Search space and selection of ``workflows/sweep.py``; never part of a stage fingerprint."""

    d: list[int] = field(default_factory=lambda: [3, 5], metadata=_check(_nonempty, _each(_ge(1))))
    l1: list[float] = field(default_factory=lambda: [1e-5, 1e-3], metadata=_check(_each(_gt(0))))
    prune_s: Optional[list[float]] = field(default=None, metadata=_check(_nonempty, _each(_gt(0))))
    channel_target: Optional[list[float]] = field(default=None, metadata=_check(_nonempty, _each(_open(0, 1))))
    num_samples: int = field(default=4, metadata=_check(_ge(1)))
    workers_per_trial: int = field(default=1, metadata=_check(_ge(1)))
    max_concurrent_trials: Optional[int] = field(default=None, metadata=_check(_ge(1)))
    in_process: bool = False
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=1, metadata=_check(_ge(1)))
    objective: Literal["dense_macs", "latency", "sparse_macs"] = "dense_macs"
    select: Literal["fewest_macs_within", "best_top1_under"] = "fewest_macs_within"
    max_top1_drop: float = field(default=0.5, metadata=_check(_finite, _ge(0)))
    max_macs: Optional[float] = field(default=None, metadata=_check(_finite, _gt(0)))
    finish_winner: bool = True

    def _cross_check(self, prefix: str) -> list[str]:
        lo_hi = list(self.l1)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            return [f"{prefix}l1: must be the log-uniform bounds [low, high] with 0 < low <= high; "
                    f"got {lo_hi!r}. Write e.g. [1e-5, 1e-3]."]
        return []


@dataclass
class PipelineConfig:
    name: str = field(default="quickstart", metadata=_check(_name_check))
    storage: str = field(default="./penni_runs", metadata=_check(_nonempty))
    seed: int = field(default=0, metadata=_check(_ge(0)))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    shrink: ShrinkConfig = field(default_factory=ShrinkConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# --------------------------------------------------------------------------------------
# YAML loading (YAML 1.2-style scalars: 1e-4 is a float, only true/false are bools)
# --------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate-key detection.

    PyYAML follows YAML 1.1, where ``1e-4`` is a *string* and ``off``/``no``/``yes`` are
    booleans (so ``amp: off`` would become ``False``).  Here ``1e-4``/``5e-5`` are floats
    and only true/false (any case) are booleans.
    """

    def construct_mapping(self, node, deep=False):  # noqa: D102
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    continue  # let the base class report unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen[key] = True
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


# --------------------------------------------------------------------------------------
# Conversion / type checking
# --------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a bool (true/false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of string -> {_describe(args[1])}" if args else "a mapping"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _type_error(key: str, tp: Any, value: Any) -> str:
    return f"{key}: expected {_describe(tp)}, got {_show(value)}."


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _convert(value: Any, tp: Any, key: str, default: Any, errors: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` or append a problem to ``errors``.

    ``default`` is the value this key has in the defaults (used to fill sections).
    """
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, default, errors)
    if tp is Any:
        if not _json_safe(value):
            errors.append(f"{key}: must be JSON-serializable (plain YAML scalars, lists, "
                          f"mappings), got {_show(value)}.")
        return value
    if tp is type(None):
        if value is None:
            return None
        errors.append(_type_error(key, tp, value))
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(_type_error(key, tp, value) + " Write true or false.")
        return default
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = " Write a whole number without a decimal point." if isinstance(value, float) else ""
        errors.append(_type_error(key, tp, value) + hint)
        return default
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(_type_error(key, tp, value))
        return default
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append(_type_error(key, tp, value) + " Quote it if it is meant as text.")
        return default

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        errors.append(_type_error(key, tp, value))
        return default
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(_type_error(key, tp, value) + " Write it as [a, b, ...].")
            return default
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]", None, errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(_type_error(key, tp, value) + " Write it as {key: value, ...}.")
            return default
        val_tp = args[1] if args else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{key}: keys must be strings, got key {_show(k)}.")
                continue
            out[k] = _convert(v, val_tp, f"{key}[{k!r}]", None, errors)
        return out
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, arm, key, default, trial)
            if not trial:
                return converted
        # Report the arm whose shape matches (e.g. a mapping given for int|dict[str,int])
        for arm in args:
            origin_arm = typing.get_origin(arm)
            if (origin_arm is dict and isinstance(value, dict)) or (
                origin_arm is list and isinstance(value, (list, tuple))
            ):
                _convert(value, arm, key, default, errors)
                return default
        errors.append(_type_error(key, tp, value))
        return default
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error


def _unknown_key_error(key: str, cls: type, prefix: str) -> str:
    names = _field_names(cls)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    msg = f"{key}: unknown key."
    if close:
        msg += " Did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?"
    msg += f" Allowed keys in {where}: {', '.join(names)}."
    return msg


def _build(cls: type, raw: Any, key: str, default: Any, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``; missing keys come from ``default``."""
    if default is None:
        default = cls()
    if raw is None:  # an empty section ("shrink:") means "all defaults"
        raw = {}
    if not isinstance(raw, dict):
        what = f"the options of section '{key}'" if key else "the top-level sections"
        errors.append(f"{key or '<top level>'}: expected a mapping of {what}, got {_show(raw)}.")
        return default
    prefix = f"{key}." if key else ""
    hints = _hints(cls)
    names = _field_names(cls)
    for k in raw:
        if not isinstance(k, str) or k not in names:
            errors.append(_unknown_key_error(f"{prefix}{k}", cls, prefix))
    values = {}
    for f in dataclasses.fields(cls):
        fkey = f"{prefix}{f.name}"
        fdefault = getattr(default, f.name)
        if f.name not in raw:
            if dataclasses.is_dataclass(fdefault):  # absent section: defaults, still checked
                values[f.name] = _build(type(fdefault), {}, fkey, fdefault, errors)
            else:
                values[f.name] = copy.deepcopy(fdefault)
            continue
        n_before = len(errors)
        value = _convert(raw[f.name], hints[f.name], fkey, fdefault, errors)
        if len(errors) == n_before and value is not None:
            for check in f.metadata.get("checks", ()):
                problem = check(value)
                if problem:
                    errors.append(f"{fkey}: {problem}; got {_show(value)}.")
                    break
        values[f.name] = value
    obj = cls(**values)
    cross = getattr(obj, "_cross_check", None)
    if cross is not None:
        errors.extend(cross(prefix))
    return obj


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def _resolve_key(path: list[str]) -> tuple[str | None, bool]:
    """Check a dotted override key against the schema.

    Returns ``(error, into_free_dict)``: ``error`` is None when the key is valid;
    ``into_free_dict`` is True when the tail addresses entries of a free-form mapping
    (``model.kwargs.width``).
    """
    cls: Any = PipelineConfig
    for i, part in enumerate(path):
        prefix = ".".join(path[:i])
        prefix = f"{prefix}." if prefix else ""
        if not dataclasses.is_dataclass(cls):
            tp = cls
            if typing.get_origin(tp) is dict and i == len(path) - 1:
                return None, True
            full = ".".join(path)
            parent = ".".join(path[:i])
            return (
                f"{full}: unknown key; '{parent}' is {_describe(tp)}, not a section. "
                f"Set it as a whole, e.g. --set '{parent}=...'."
            ), False
        if part not in _field_names(cls):
            return _unknown_key_error(".".join(path[: i + 1]), cls, prefix), False
        cls = _hints(cls)[part]
    return None, False


def _apply_override(raw: dict, override: str, errors: list[str]) -> None:
    if not isinstance(override, str) or "=" not in override:
        errors.append(
            f"override {override!r}: expected 'dotted.key=value' (e.g. retrain.l1=5e-5)."
        )
        return
    key, text = override.split("=", 1)
    key = key.strip()
    path = key.split(".")
    if not key or any(not p for p in path):
        errors.append(f"override {override!r}: empty key or key part; expected 'a.b.c=value'.")
        return
    problem, into_dict = _resolve_key(path)
    if problem:
        errors.append(f"{problem} (from override {override!r})")
        return
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        errors.append(
            f"{key}: cannot parse override value {text!r} as YAML "
            f"({' '.join(str(exc).split())}). "
            f"Quote strings with special characters."
        )
        return
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and not into_dict:
        cls: Any = PipelineConfig
        for part in path:
            cls = _hints(cls)[part]
        if dataclasses.is_dataclass(cls):  # section given as a mapping: merge it
            node[last].update(value)
            return
    node[last] = value


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def available_configs(base_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Names of the YAML configs in ``base_dir`` (without extension)."""
    base = Path(base_dir)
    if not base.is_dir():
        return []
    return sorted(p.stem for p in base.iterdir() if p.suffix in (".yaml", ".yml"))


def resolve_config_path(path: str | Path | None = None, base_dir: str | Path = CONFIG_DIR) -> Path:
    """Resolve ``None`` (quickstart), a bare name ("fashion_vgg16") or a path to a file."""
    base = Path(base_dir)
    if path is None:
        path = DEFAULT_CONFIG
    p = Path(path).expanduser()
    if p.is_file():
        return p
    candidates = []
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:
        candidates = [base / f"{p.name}.yaml", base / f"{p.name}.yml"]
    elif len(p.parts) == 1:
        candidates = [base / p.name]
    for c in candidates:
        if c.is_file():
            return c
    names = available_configs(base)
    raise ConfigError(
        f"config {str(path)!r}: no such file (also looked in {base}). "
        f"Pass a YAML path or one of: {', '.join(names) or '(none found)'}."
    )


def from_dict(
    raw: dict | None, overrides: Iterable[str] = (), source: str | None = None
) -> PipelineConfig:
    """Build and validate a config from a plain (YAML-shaped) dict plus overrides."""
    errors: list[str] = []
    data = copy.deepcopy(raw) if raw is not None else {}
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(data, dict):
        for ov in overrides:
            _apply_override(data, ov, errors)
    cfg = _build(PipelineConfig, data, "", PipelineConfig(), errors)
    if errors:
        raise ConfigError(errors, source=source)
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base_dir: str | Path = CONFIG_DIR,
) -> PipelineConfig:
    """Load, override and validate a pipeline config.

    ``path``: None -> ``workflows/configs/quickstart.yaml``; a bare name such as
    ``"fashion_vgg16"`` resolves in ``base_dir``; otherwise a YAML file path.
    ``overrides``: ``"a.b.c=value"`` strings, values parsed as YAML
    (``retrain.l1=5e-5``, ``decompose.exclude=[conv1]``, ``ray.address=null``).
    Raises :class:`ConfigError` listing every problem found.
    """
    file = resolve_config_path(path, base_dir)
    try:
        raw = _yaml_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"cannot parse YAML: {exc}. Fix the syntax at the position shown.", source=str(file)
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=str(file)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"<top level>: expected a mapping of sections (name, model, data, ...), "
            f"got {_show(raw)}.",
            source=str(file),
        )
    return from_dict(raw, overrides, source=str(file))


def apply_overrides(cfg: PipelineConfig, overrides: Iterable[str]) -> PipelineConfig:
    """Return a new validated config: ``cfg`` with ``"a.b=value"`` overrides applied."""
    return from_dict(to_dict(cfg), overrides)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (JSON-serializable) of a config or config section."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, str | int | float | bool]:
    """Dotted-key params for MLflow: scalars as is, lists/dicts as JSON, None as "null"."""
    out: dict[str, str | int | float | bool] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(v):
                walk(v, f"{key}.")
            elif isinstance(v, (list, tuple, dict)):
                out[key] = json.dumps(v, sort_keys=True, separators=(",", ":"))
            elif v is None:
                out[key] = "null"
            else:
                out[key] = v

    walk(cfg, "")
    return out


def _lookup(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node[part]
    return node


def section_fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """sha256 hex of the canonical JSON of the config values ``stage`` depends on."""
    if stage not in STAGE_DEPENDENCIES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    d = to_dict(cfg)
    payload = {
        "stage": stage,
        "config": {key: _lookup(d, key) for key in STAGE_DEPENDENCIES[stage]},
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dump_yaml(cfg: PipelineConfig) -> str:
    """YAML text of the full config; ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
