"""The pipeline config: loading, ``--set`` overrides and validation errors.

The schema (one strict pydantic model per section, defaults = ``pipeline/config/presets/quickstart.yaml``)
is in ``pipeline/config/schema.py`` and re-exported here; ``docs/DESIGN.md`` documents it.

Loading goes ``YAML file -> raw dict -> "a.b.c=value" overrides -> validated models``.
Every problem (unknown keys, wrong types, out-of-range values, cross-field rules) is
collected and raised together as one :class:`ConfigError`, one problem per line, each
naming the full dotted key; unknown keys get a did-you-mean suggestion.

Only pydantic and PyYAML are used here: this module is imported by the CLI, by Ray workers
and by tests, none of which should pay for torch / ray / mlflow imports.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, Discriminator, ValidationError

from .schema import (
    PipelineConfig,
)

__all__ = [
    "CONFIG_DIR", "ConfigError",
    "load_config", "from_dict", "apply_overrides", "resolve_config_path", "available_configs",
    "to_dict", "flatten", "dump_yaml",
]

#: Folder holding the shipped configs; bare names ("fashion_vgg16") resolve here.
CONFIG_DIR: Path = Path(__file__).resolve().parent / "presets"
DEFAULT_CONFIG = "quickstart"


class ConfigError(ValueError):
    """An invalid pipeline configuration; ``errors`` holds one message per problem."""

    def __init__(self, errors: Iterable[str] | str, source: str | None = None):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f" ({source})" if source else ""
        n = len(self.errors)
        head = f"invalid pipeline config{where}: {n} problem{'s' if n != 1 else ''}"
        body = "\n".join(f"  - {e}" for e in self.errors)
        tail = "Fix the value(s) in the YAML file, or override them with --set key=value (e.g. --set retrain.l1=5e-5)."
        super().__init__(f"{head}\n{body}\n{tail}")


# --------------------------------------------------------------------------------------
# YAML loading (YAML 1.2-style scalars: 1e-4 is a float, only true/false are bools)
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate-key detection.

    PyYAML follows YAML 1.1, where ``1e-4`` is a *string* and ``off``/``no``/``yes`` are
    booleans (so ``amp: off`` would become ``False``).  Here ``1e-4``/``5e-5`` are floats
    and only true/false (any case) are booleans; a key given twice is an error.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


#: How many values YAML aliases may add when expanded. A config has a few hundred values; nested anchors
#: ("billion laughs") multiply with every level, so a 600-byte file could stand for billions of them.
ALIAS_EXPANSION_BUDGET = 10_000


class AliasBudgetError(yaml.YAMLError):
    """The document's aliases expand beyond :data:`ALIAS_EXPANSION_BUDGET` values; ``key`` holds the expansion."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key or '<top level>'}: {detail}")
        self.key, self.detail = key, detail


def _yaml_load(text: str) -> Any:
    """Parse one YAML document; refuse it before construction when its aliases expand too far."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_alias_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_sizes(root: yaml.Node) -> dict[int, int]:
    """Values under each node once every alias is written out, memoized per node (linear in the distinct nodes)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_alias_expansion(root: yaml.Node) -> None:
    """Raise :class:`AliasBudgetError` naming the key whose aliases expand beyond the budget."""
    sizes = _expanded_sizes(root)
    distinct = len(sizes)
    if sizes[id(root)] - distinct <= ALIAS_EXPANSION_BUDGET:
        return
    path, node = [], root
    while True:  # follow the largest child down to the key that holds the expansion
        labelled = (list((k.value if isinstance(k, yaml.ScalarNode) else "?", v) for k, v in node.value)
                    if isinstance(node, yaml.MappingNode) else
                    [(f"[{i}]", v) for i, v in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else [])
        big = [(label, v) for label, v in labelled if sizes.get(id(v), 1) > ALIAS_EXPANSION_BUDGET]
        if len(big) != 1 or len(path) >= 8:
            break
        path.append(big[0][0])
        node = big[0][1]
    raise AliasBudgetError(".".join(path).replace(".[", "["),
                           f"YAML anchors and aliases expand to {sizes[id(node)]:,} values, more than "
                           f"{ALIAS_EXPANSION_BUDGET:,} (nested anchors multiply); write the values out instead")


# --------------------------------------------------------------------------------------
# Pydantic errors -> one line per problem, named by the dotted key
# --------------------------------------------------------------------------------------

_HINTS = {
    "bool_type": " Write true or false.",
    "string_type": " Quote it if it is meant as text.",
    "list_type": " Write it as [a, b, ...].",
    "dict_type": " Write it as {key: value, ...}.",
}


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:77] + '...' if len(text) > 80 else text} ({type(value).__name__})"


def _field_path(loc: tuple) -> tuple[list[str], type, tuple]:
    """Split a pydantic location into the field names, the model holding the last one, and the rest."""
    model, names, i = PipelineConfig, [], 0
    while i < len(loc) and isinstance(model, type) and issubclass(model, BaseModel) and loc[i] in model.model_fields:
        info = model.model_fields[loc[i]]
        names.append(loc[i])
        i += 1
        if any(isinstance(m, Discriminator) for m in info.metadata) and i < len(loc):
            i += 1  # skip the union arm's tag
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return names, model, loc[i:]
        model = info.annotation
    return names, model, loc[i:]


def _unknown_key(key: str, model: type[BaseModel], prefix: str) -> str:
    names = list(model.model_fields)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=3, cutoff=0.6)
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    hint = (" Did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?") if close else ""
    return f"{key}: unknown key.{hint} Allowed keys in {where}: {', '.join(names)}."


def _problems(err: dict) -> list[str]:
    """The message(s) of one pydantic error, each starting with the full dotted key."""
    names, model, rest = _field_path(tuple(err["loc"]))
    key = ".".join(names)
    if err["type"] in ("extra_forbidden", "invalid_key"):
        prefix = f"{key}." if key else ""
        return [_unknown_key(prefix + ".".join(map(str, rest)), model, prefix)]
    if err["type"] == "cross_field":
        prefix = f"{key}." if key else ""
        return [f"{prefix}{field}: {text.replace('{at}', prefix)}" for field, text in err["ctx"]["problems"]]
    if err["type"] == "model_type":
        return [f"{key}: expected a mapping of the options of section '{key}', got {_show(err['input'])}."]
    if rest and rest[-1] == "[key]":  # a mapping key that is not a string
        return [f"{key}: keys must be strings, got key {_show(err['input'])}."]
    key += "".join(f"[{part!r}]" for part in rest)
    msg = err["msg"].removeprefix("Value error, ")
    hint = _HINTS.get(err["type"], "")
    if err["type"] == "int_type" and isinstance(err["input"], float):
        hint = " Write a whole number without a decimal point."
    return [f"{key}: {msg[0].lower()}{msg[1:]}; got {_show(err['input'])}.{hint}"]


def _validate(data: dict, errors: list[str]) -> PipelineConfig | None:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors.extend(p for err in exc.errors() for p in _problems(err))
        return None


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def _resolve_key(path: list[str]) -> tuple[str | None, bool]:
    """``(problem or None, into_free_dict)`` for a dotted override key checked against the schema."""
    model: Any = PipelineConfig
    for i, part in enumerate(path):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            if typing.get_origin(model) is dict and i == len(path) - 1:
                return None, True
            parent = ".".join(path[:i])
            return (f"{'.'.join(path)}: unknown key; '{parent}' is a value, not a section. "
                    f"Set it as a whole, e.g. --set '{parent}=...'."), False
        if part not in model.model_fields:
            prefix = ".".join(path[:i]) + "." if i else ""
            return _unknown_key(".".join(path[: i + 1]), model, prefix), False
        model = model.model_fields[part].annotation
    return None, False


def _parse_override(override: Any, errors: list[str]) -> tuple[list[str], Any, bool] | None:
    """``(path, value, into_free_dict)`` of one ``a.b.c=value`` string, or None after an error."""
    if not isinstance(override, str) or "=" not in override:
        errors.append(f"override {override!r}: expected 'dotted.key=value' (e.g. retrain.l1=5e-5).")
        return None
    key, text = (part.strip() for part in override.split("=", 1))
    path = key.split(".")
    if not all(path):
        errors.append(f"override {override!r}: empty key or key part; expected 'a.b.c=value'.")
        return None
    problem, into_dict = _resolve_key(path)
    if problem:
        errors.append(f"{problem} (from override {override!r})")
        return None
    try:
        return path, (_yaml_load(text) if text else None), into_dict
    except AliasBudgetError as exc:
        errors.append(f"{'.'.join(filter(None, [key, exc.key])).replace('.[', '[')}: {exc.detail}")
        return None
    except yaml.YAMLError as exc:
        errors.append(f"{key}: cannot parse override value {text!r} as YAML ({' '.join(str(exc).split())}). "
                      "Quote strings with special characters.")
        return None


def _apply_override(raw: dict, override: str, errors: list[str]) -> None:
    """Set one dotted key in ``raw``; a mapping given for a section is merged into it."""
    parsed = _parse_override(override, errors)
    if parsed is None:
        return
    path, value, into_dict = parsed
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and not into_dict and _is_section(path):
        node[last].update(value)  # a section given as a mapping: merge it
        return
    node[last] = value


def _is_section(path: list[str]) -> bool:
    """Whether a (valid) dotted key names a whole section rather than a value."""
    model: Any = PipelineConfig
    for part in path:
        model = model.model_fields[part].annotation
    return isinstance(model, type) and issubclass(model, BaseModel)


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
    p = Path(DEFAULT_CONFIG if path is None else path).expanduser()
    if p.is_file():
        return p
    candidates = []
    if len(p.parts) == 1:
        candidates = [base / p.name] if p.suffix in (".yaml", ".yml") else [base / f"{p.name}.yaml",
                                                                            base / f"{p.name}.yml"]
    for c in candidates:
        if c.is_file():
            return c
    names = available_configs(base)
    raise ConfigError(f"config {str(path)!r}: no such file (also looked in {base}). "
                      f"Pass a YAML path or one of: {', '.join(names) or '(none found)'}.")


def from_dict(raw: dict | None, overrides: Iterable[str] = (), source: str | None = None) -> PipelineConfig:
    """Build and validate a config from a plain (YAML-shaped) dict plus overrides."""
    errors: list[str] = []
    data = copy.deepcopy(raw) if raw is not None else {}
    if isinstance(data, dict):
        for override in [overrides] if isinstance(overrides, str) else overrides:
            _apply_override(data, override, errors)
    cfg = _validate(data, errors)
    if errors:
        raise ConfigError(errors, source=source)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                base_dir: str | Path = CONFIG_DIR) -> PipelineConfig:
    """Load, override and validate a pipeline config.

    ``path``: None -> quickstart; a bare name such as ``"fashion_vgg16"`` resolves in
    ``base_dir``; otherwise a YAML file path.  ``overrides``: ``"a.b.c=value"`` strings,
    values parsed as YAML (``retrain.l1=5e-5``, ``decompose.exclude=[conv1]``, ``ray.address=null``).
    Raises :class:`ConfigError` listing every problem found.
    """
    file = resolve_config_path(path, base_dir)
    try:
        raw = _yaml_load(file.read_text(encoding="utf-8"))
    except AliasBudgetError as exc:
        raise ConfigError(str(exc), source=str(file)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML: {exc}. Fix the syntax at the position shown.",
                          source=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=str(file)) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"<top level>: expected a mapping of sections (name, model, data, ...), got {_show(raw)}.",
                          source=str(file))
    return from_dict(raw or {}, overrides, source=str(file))


def apply_overrides(cfg: PipelineConfig, overrides: Iterable[str]) -> PipelineConfig:
    """Return a new validated config: ``cfg`` with ``"a.b=value"`` overrides applied."""
    return from_dict(to_dict(cfg), overrides)


def to_dict(cfg: BaseModel) -> dict:
    """Plain nested dict (JSON-serializable) of a config or config section."""
    return cfg.model_dump(mode="python")


def flatten(cfg: BaseModel) -> dict[str, str | int | float | bool]:
    """Dotted-key params for MLflow: scalars as is, lists/dicts as JSON, None as "null"."""
    out: dict[str, str | int | float | bool] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out.update({f"{name}.{k}": v for k, v in flatten(value).items()})
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value, sort_keys=True, separators=(",", ":"))
        else:
            out[name] = "null" if value is None else value
    return out



def dump_yaml(cfg: PipelineConfig) -> str:
    """YAML text of the full config; ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
