"""The sections of the pipeline config: strict pydantic models whose defaults are the quickstart run.

Each field's type carries its check (``PosInt``, ``Fraction``, ...); rules between fields of one
section are in its ``problems()``.  Loading, overrides and error messages are in ``pipeline/config/loading.py``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # open interval (0, 1)
UnitFraction = Annotated[float, Field(ge=0, le=1)]  # closed interval [0, 1]
Momentum = Annotated[float, Field(ge=0, lt=1)]


def _d_kind(value: Any) -> str | None:
    """Which arm of ``decompose.d`` a value is (None: neither, one clear error)."""
    if isinstance(value, dict):
        return "per_layer"
    return "int" if isinstance(value, int) and not isinstance(value, bool) else None


def _channels_last_kind(value: Any) -> str | None:
    return "bool" if isinstance(value, bool) else ("auto" if value == "auto" else None)


BasisSize = Annotated[
    Union[Annotated[PosInt, Tag("int")], Annotated[dict[str, PosInt], Tag("per_layer")]],
    Discriminator(_d_kind, custom_error_type="int_or_mapping",
                  custom_error_message="Input should be an int >= 1 or a mapping {layer name: int >= 1}"),
]
ChannelsLast = Annotated[
    Union[Annotated[Literal["auto"], Tag("auto")], Annotated[bool, Tag("bool")]],
    Discriminator(_channels_last_kind, custom_error_type="auto_or_bool",
                  custom_error_message="Input should be 'auto', true or false"),
]
AutoOrBool = ChannelsLast  # the same three values, "auto", true or false (data.hflip)


class _Section(BaseModel):
    """Strict, closed config section: an empty section (``shrink:``) means all defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data

    @model_validator(mode="after")
    def _cross_fields(self) -> "_Section":
        problems = self.problems()
        if problems:
            summary = "; ".join(f"{key}: {text}" for key, text in problems)
            raise PydanticCustomError("cross_field", "{summary}", {"summary": summary, "problems": problems})
        return self

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems as ``(field, text)``; ``{at}`` in text becomes the section prefix."""
        return []


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


TORCHVISION_ARCH = "torchvision.models:"  # the one spelling of a torchvision arch (as penni.models.TORCHVISION_ARCH)
LEGACY_TORCHVISION_ARCH = "torchvision:"   # accepted and normalized (this module must not import torch, so no import)


class ModelConfig(_Section):
    """The network to compress: a penni/torchvision architecture and its shape."""

    arch: str = Field("fashion_cnn", min_length=1)  # "vgg16", ... or "torchvision.models:<name>"
    num_classes: PosInt = 10
    in_channels: PosInt = 1
    weights: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _json_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("must be JSON-serializable (plain YAML scalars, lists, mappings)") from None
        return value

    @field_validator("arch")
    @classmethod
    def _one_torchvision_spelling(cls, value: str) -> str:
        """``torchvision:<name>`` (the older spelling) is read as ``torchvision.models:<name>``."""
        if value.startswith(LEGACY_TORCHVISION_ARCH):
            return TORCHVISION_ARCH + value[len(LEGACY_TORCHVISION_ARCH):]
        return value


class DataConfig(_Section):
    """Dataset, subsets, batch sizes and the input pipeline."""

    dataset: Literal["fashion_mnist", "imagefolder", "parquet", "synthetic"] = "fashion_mnist"
    root: Optional[str] = None
    train_subset: Optional[PosInt] = 20000
    val_fraction: Fraction = 0.1
    val_subset: Optional[PosInt] = 2000
    test_subset: Optional[PosInt] = None
    batch_size: PosInt = 128
    eval_batch_size: PosInt = 256
    loader_workers: NonNegInt = 0
    image_size: PosInt = 28
    synthetic_size: PosInt = 1024
    loader: Literal["auto", "torch", "ray_data", "device"] = "auto"
    augment: Literal["auto", "imagenet", "small", "none"] = "auto"
    hflip: AutoOrBool = "auto"  # auto: mirror only datasets known to be flip-invariant (pipeline/data/transforms.py)
    normalize: Literal["auto", "imagenet", "dataset", "none"] = "auto"
    decode: Literal["cpu", "device"] = "cpu"  # ray_data: decode on CPU workers, or ship bytes and decode on the GPU

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.dataset in ("imagefolder", "parquet") and not self.root:
            found.append(("root", f"required when {{at}}dataset is {self.dataset!r}; got {self.root!r}. Set it to the "
                                  f"dataset directory or URI (e.g. --set {{at}}root=/mnt/data/imagenet)."))
        if self.decode == "device" and (self.dataset != "parquet" or self.loader not in ("auto", "ray_data")):
            found.append(("decode", f"'device' ships encoded images through Ray Data (dataset 'parquet', loader "
                                    f"'ray_data' or 'auto'); got dataset {self.dataset!r}, loader {self.loader!r}. "
                                    "Use --set {at}decode=cpu, or Parquet shards with data.loader=ray_data."))
        return found


class RayConfig(_Section):
    """Where and how wide the training stages run."""

    address: Optional[str] = None
    num_workers: PosInt = 2
    use_gpu: bool = False
    cpus_per_worker: PosFloat = 1.0
    max_failures: NonNegInt = 0
    stage_retries: NonNegInt = 1
    in_process: bool = False


class TrackingConfig(_Section):
    """MLflow tracking server and experiment."""

    uri: Optional[str] = None
    experiment: str = Field("penni", min_length=1)


class TrainConfig(_Section):
    """Optimizer, schedule and precision of one training stage."""

    epochs: NonNegInt = 1
    lr: PosFloat = 0.01
    momentum: Momentum = 0.9
    weight_decay: NonNegFloat = 5e-4
    nesterov: bool = True
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[Fraction] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: PosFloat = 0.1
    label_smoothing: Momentum = 0.0
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: ChannelsLast = "auto"

    def problems(self) -> list[tuple[str, str]]:
        found, ms = [], list(self.milestones)
        if any(b <= a for a, b in zip(ms, ms[1:])):
            found.append(("milestones", f"must be strictly ascending fractions of the epochs; got {ms!r}. "
                                        "Sort them, e.g. [0.5, 0.75]."))
        if self.lr_schedule == "multistep" and not ms:
            found.append(("milestones", "lr_schedule 'multistep' needs at least one milestone; got []. "
                                        "Set e.g. {at}milestones=[0.5,0.75] or use lr_schedule=cosine."))
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            found.append(("nesterov", "true requires momentum > 0 with sgd; got momentum 0. "
                                      "Set {at}nesterov=false or a momentum such as 0.9."))
        return found


class BaselineConfig(TrainConfig):
    """Train the uncompressed model (or load ``checkpoint``)."""

    epochs: NonNegInt = 5
    lr: PosFloat = 0.05
    checkpoint: Optional[str] = None


class DecomposeConfig(_Section):
    """Basis kernels per layer (``d``: one for all, or per layer name)."""

    d: BasisSize = 5
    exclude: list[str] = Field(default_factory=list)


class RetrainConfig(TrainConfig):
    """Learn the basis and sparse coefficients (L1, group L1), alternating."""

    epochs: PosInt = 5  # at least one: the stage's model is its last epoch's checkpoint
    lr: PosFloat = 0.02
    l1: NonNegFloat = 3e-3
    group_l1: NonNegFloat = 2e-2
    alternate_every: PosInt = 1
    start_with: Literal["coefficients", "basis", "joint"] = "coefficients"
    include_pointwise: bool = False


PruneRule = Literal["channels", "std", "sparsity"]
CHANNEL_RULE = "channels"                # whole channel groups, to target_dense_macs_reduction (penni.prune_channels)
ELEMENT_RULES = ("std", "sparsity")      # single coefficients (penni.prune), after the channels
PRUNE_RULE_HELP = ("use 'channels', 'std' or 'sparsity', or 'channels' with one of the other two: "
                   "'channels+std' or the list [channels, sparsity]")


class PruneConfig(_Section):
    """Which coefficients and channels to remove."""

    # The rules, channels first: a list (``[channels, std]``) or the "+"-joined string configs have always used
    # (``channels+std``), parsed here and nowhere else.
    rule: list[PruneRule] = Field(default_factory=lambda: ["channels", "std"])
    s: PosFloat = 1.25
    target: Optional[Fraction] = None
    target_dense_macs_reduction: Optional[Fraction] = 0.7
    include_pointwise: bool = False
    # A measured speed-up instead of the dense-MAC target (> 1; it replaces target_dense_macs_reduction): channels
    # go by importance per latency saved until the shrunk model runs that much faster in latency_runtime at every
    # one of latency_batch_sizes, timed where the stage runs (penni.prune_channels(cost="latency")).
    target_speedup: Optional[PosFloat] = None
    latency_runtime: Literal["torch", "onnxruntime"] = "torch"
    latency_batch_sizes: list[PosInt] = Field(default_factory=lambda: [1, 64], min_length=1)

    @field_validator("rule", mode="before")
    @classmethod
    def _rule_names(cls, value: Any) -> list[str]:
        names = value.split("+") if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise ValueError(f"must name a rule or a list of rules; {PRUNE_RULE_HELP}")
        unknown = [n for n in names if n != CHANNEL_RULE and n not in ELEMENT_RULES]
        if unknown:
            raise ValueError(f"unknown rule {unknown[0]!r}; {PRUNE_RULE_HELP}")
        twice = [n for n in names if names.count(n) > 1]
        if twice:
            raise ValueError(f"names {twice[0]!r} twice; {PRUNE_RULE_HELP}")
        elements = [n for n in names if n in ELEMENT_RULES]
        if len(elements) > 1:
            raise ValueError(f"'std' and 'sparsity' do not combine; {PRUNE_RULE_HELP}")
        return [CHANNEL_RULE] * (CHANNEL_RULE in names) + elements  # channels first, as the prune stage runs them

    @field_serializer("rule")
    def _rule_as_string(self, rule: list[str]) -> str:
        # Dumped as the old "+"-joined string: the stage fingerprints hash model_dump() of this section
        # (pipeline/stages/fingerprints.py), so configs written before the list keep their fingerprints.
        return "+".join(rule)

    @model_serializer(mode="wrap")
    def _latency_keys_when_set(self, handler: Any) -> dict:
        # The latency keys are dumped only when they differ from their defaults, so a run that does not use them
        # keeps the prune fingerprint it had before they existed (fingerprints hash model_dump() of this section).
        dumped = handler(self)
        for key in ("target_speedup", "latency_runtime", "latency_batch_sizes"):
            if dumped.get(key) == type(self).model_fields[key].get_default(call_default_factory=True):
                dumped.pop(key)
        return dumped

    @property
    def channels(self) -> bool:
        """Whether whole channel groups go first (``penni.prune_channels``)."""
        return CHANNEL_RULE in self.rule

    @property
    def element_rule(self) -> str | None:
        """The rule ``penni.prune`` applies after the channels ("std" or "sparsity"), if any."""
        return next((r for r in self.rule if r in ELEMENT_RULES), None)

    def problems(self) -> list[tuple[str, str]]:
        found, rule = [], "+".join(self.rule)
        if self.element_rule == "sparsity" and self.target is None:
            found.append(("target", f"required when {{at}}rule is {rule!r}; got null. "
                                    "Set a fraction in (0, 1), e.g. --set {at}target=0.9."))
        if self.target_speedup is not None and self.target_speedup <= 1:
            found.append(("target_speedup", f"must be a speed-up > 1 (2.0: twice as fast); got {self.target_speedup!r}. "
                                            "Set null to prune to target_dense_macs_reduction instead."))
        if self.target_speedup is not None and not self.channels:
            found.append(("target_speedup", f"needs the channels rule (a speed-up comes from narrower layers); "
                                            f"{{at}}rule is {rule!r}. Use e.g. --set {{at}}rule=channels+std."))
        if self.channels and self.target_dense_macs_reduction is None and self.target_speedup is None:
            found.append(("target_dense_macs_reduction", f"required when {{at}}rule is {rule!r}; got null. "
                          "Set the fraction of dense MACs to remove, e.g. --set {at}target_dense_macs_reduction=0.6."))
        return found


class FinetuneConfig(TrainConfig):
    """Recover accuracy with the pruning masks held, optionally distilling from the retrained model."""

    epochs: PosInt = 10  # at least one: the stage's model is its best epoch's checkpoint
    lr: PosFloat = 0.02
    distill: bool = False
    distill_temperature: PosFloat = 4.0
    distill_weight: UnitFraction = 0.5  # weight of the KL term; the label loss gets 1 - distill_weight


class CompressConfig(_Section):
    """An accuracy budget: progressive channel pruning, each step fine-tuned shortly, the last step within
    ``max_top1_drop`` kept (pipeline/stages/compress.py); null: the prune stage's one-shot pruning, as before."""

    max_top1_drop: Optional[NonNegFloat] = None  # points of validation top-1 the model may lose against the baseline
    # cumulative dense-MAC reductions of the retrained model's cost, one per step; capped at
    # prune.target_dense_macs_reduction (which becomes the last step) when that is set
    steps: list[Fraction] = Field(default_factory=lambda: [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9], min_length=1)
    # fine-tuning per step (the finetune section's optimizer and distillation); null: a quarter of finetune.epochs
    # (at least 1), so data that needs a longer fine-tuning gets longer steps
    step_epochs: Optional[PosInt] = None
    step_lr: Optional[PosFloat] = None  # null: finetune.lr / 4 (a short run must not undo the step)

    def problems(self) -> list[tuple[str, str]]:
        steps = list(self.steps)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            return [("steps", f"must be strictly ascending cumulative dense-MAC reductions; got {steps!r}. "
                              "Sort them, e.g. [0.3, 0.5, 0.7].")]
        return []


class ShrinkConfig(_Section):
    """Physically remove pruned channels."""

    enabled: bool = True
    round_to: Optional[PosInt] = None  # kept widths a multiple of this (GPU)


class EvaluateConfig(_Section):
    """Latency measurement of the evaluate stage."""

    latency_batch_sizes: list[PosInt] = Field(default_factory=lambda: [1, 64])
    latency_repeats: PosInt = 20


class SweepConfig(_Section):
    """Search space and selection of ``workflows/sweep.py``; never part of a stage fingerprint."""

    d: list[PosInt] = Field(default_factory=lambda: [3, 5], min_length=1)
    l1: list[PosFloat] = Field(default_factory=lambda: [1e-5, 1e-3])  # log-uniform bounds [low, high]
    prune_s: Optional[list[PosFloat]] = Field(None, min_length=1)
    channel_target: Optional[list[Fraction]] = Field(None, min_length=1)
    num_samples: PosInt = 4
    workers_per_trial: PosInt = 1
    max_concurrent_trials: Optional[PosInt] = None
    in_process: bool = False
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: PosInt = 1
    objective: Literal["dense_macs", "latency", "sparse_macs"] = "dense_macs"
    select: Literal["fewest_macs_within", "best_top1_under"] = "fewest_macs_within"
    max_top1_drop: NonNegFloat = 0.5
    max_macs: Optional[PosFloat] = None
    finish_winner: bool = True

    def problems(self) -> list[tuple[str, str]]:
        bounds = list(self.l1)
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            return [("l1", f"must be the log-uniform bounds [low, high] with 0 < low <= high; got {bounds!r}. "
                           "Write e.g. [1e-5, 1e-3].")]
        return []


class LimitsConfig(_Section):
    """Bounds on values that, beyond them, can only fail late or run for ever (``epochs=1e12``, a 100,000-pixel
    image): checked before any job starts. Raise one to mean it (``--set limits.max_epochs=100000``)."""

    max_epochs: PosInt = 10_000           # each training stage's epochs and compress.step_epochs
    max_image_size: PosInt = 4_096        # data.image_size, pixels per side
    max_batch_memory: Fraction = 0.25     # one input batch (float32) as a fraction of this machine's memory
    max_loader_workers: PosInt = 256      # data.loader_workers (processes per training worker)
    max_repeats: PosInt = 100_000         # evaluate.latency_repeats and sweep.num_samples
    max_synthetic_examples: PosInt = 100_000_000  # data.synthetic_size


def _machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _runaway_values(cfg: "PipelineConfig") -> list[tuple[str, str]]:
    """Values past ``cfg.limits``: each names the key, the bound and the override."""
    lim, found = cfg.limits, []

    def over(key: str, value: float, bound: float, limit: str, what: str) -> None:
        if value > bound:
            found.append((key, f"{value:,} is more than {bound:,} {what}; lower it, or raise the bound if you "
                               f"mean it: --set limits.{limit}={value}."))

    for section in ("baseline", "retrain", "finetune"):
        over(f"{section}.epochs", getattr(cfg, section).epochs, lim.max_epochs, "max_epochs", "epochs")
    over("compress.step_epochs", cfg.compress.step_epochs or 0, lim.max_epochs, "max_epochs", "epochs")
    over("data.image_size", cfg.data.image_size, lim.max_image_size, "max_image_size", "pixels per side")
    over("data.loader_workers", cfg.data.loader_workers, lim.max_loader_workers, "max_loader_workers", "processes")
    over("data.synthetic_size", cfg.data.synthetic_size, lim.max_synthetic_examples, "max_synthetic_examples",
         "examples")
    over("evaluate.latency_repeats", cfg.evaluate.latency_repeats, lim.max_repeats, "max_repeats", "repeats")
    over("sweep.num_samples", cfg.sweep.num_samples, lim.max_repeats, "max_repeats", "trials")
    memory = _machine_memory()
    if memory is None or cfg.data.image_size > lim.max_image_size:
        return found
    per_example = 4 * cfg.model.in_channels * cfg.data.image_size ** 2
    for key, size in [("data.batch_size", cfg.data.batch_size), ("data.eval_batch_size", cfg.data.eval_batch_size),
                      *((f"prune.latency_batch_sizes[{i}]", b) for i, b in enumerate(cfg.prune.latency_batch_sizes)),
                      *((f"evaluate.latency_batch_sizes[{i}]", b)
                        for i, b in enumerate(cfg.evaluate.latency_batch_sizes))]:
        if size * per_example > lim.max_batch_memory * memory:
            found.append((key, f"{size:,} input{'s' * (size != 1)} of {cfg.model.in_channels}x{cfg.data.image_size}x"
                               f"{cfg.data.image_size} take {size * per_example / 2**30:,.1f} GiB before any "
                               f"activation, more than {lim.max_batch_memory:g} of this machine's "
                               f"{memory / 2**30:,.0f} GiB; lower it, or raise limits.max_batch_memory (< 1)."))
    return found


class PipelineConfig(_Section):
    """The whole run: its name and storage, and one section per concern."""

    name: str = "quickstart"
    storage: str = Field("./penni_runs", min_length=1)
    seed: NonNegInt = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    decompose: DecomposeConfig = Field(default_factory=DecomposeConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    shrink: ShrinkConfig = Field(default_factory=ShrinkConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    def problems(self) -> list[tuple[str, str]]:
        return _runaway_values(self)

    @field_validator("name")
    @classmethod
    def _path_safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("must match [A-Za-z0-9_.-]+ (letters, digits, '_', '.', '-'; no spaces or '/')")
        if value in (".", ".."):
            raise ValueError("must not be '.' or '..'")
        return value
