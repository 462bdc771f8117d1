"""The pipeline's stages in one table: what each reads, which config it depends on, what runs it, what it writes.

The DAG (order, inputs, Ray task or Ray Train), the fingerprints (``pipeline.stages.fingerprints``),
the runner, the sweep and the docs all read this table. It holds the stage functions themselves
(``pipeline.stages.functions``), so the edge from the table to the code it runs is a plain import.

Adding a stage: one ``Stage(...)`` entry here (in run order) and one ``run_<name>(ctx) -> dict``
function in ``pipeline/stages/functions.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .functions import (
    run_baseline,
    run_decompose,
    run_evaluate,
    run_finetune,
    run_prune,
    run_report,
    run_retrain,
    run_shrink,
)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    inputs: tuple[str, ...]   # earlier stages whose committed outputs it reads (ctx.inputs)
    config: tuple[str, ...]   # config sections or dotted keys its fingerprint hashes (besides its inputs')
    function: Callable[..., dict]  # its ``run_<name>(ctx) -> metrics`` in pipeline/stages/functions.py
    trains: bool              # hands a training loop to Ray Train (driven from the driver, not a Ray task)
    writes: tuple[str, ...]   # files it always commits (glob patterns)
    may_write: tuple[str, ...] = ()  # files it commits only in some configurations
    does: str = ""            # one line for the docs
    reads_also: tuple[str, ...] = ()  # stages it also reads that are upstream of its inputs (their fingerprints
    #                                   are inside its inputs' already, so they are fetched but not hashed again)
    trains_when: str = ""     # a dotted config key: while its value is set, this stage trains too (on the driver,
    #                           through ctx.train) and its fingerprint also hashes ``when_training``
    when_training: tuple[str, ...] = ()

    def trains_for(self, cfg) -> bool:
        """Whether this stage trains in ``cfg``'s run (always, never, or while ``trains_when`` is set)."""
        if self.trains or not self.trains_when:
            return self.trains
        value = cfg
        for part in self.trains_when.split("."):
            value = getattr(value, part)
        return value is not None

    def config_for(self, cfg) -> tuple[str, ...]:
        """The config keys its fingerprint hashes in ``cfg``'s run."""
        return self.config + (self.when_training if self.trains_for(cfg) else ())


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("baseline", (), ("seed", "model", "data", "baseline", "ray.use_gpu"), run_baseline, True,
          ("model.safetensors",), ("history.json",),
          "train the dense model (or load baseline.checkpoint / model.weights)"),
    Stage("decompose", ("baseline",), ("decompose",), run_decompose, False,
          ("model.safetensors", "approximation_error.json"), (),
          "SVD-initialized PenniConv2d layers, d filters per layer"),
    Stage("retrain", ("decompose",), ("retrain", "data", "seed"), run_retrain, True,
          ("model.safetensors", "history.json"), (),
          "L1 / group lasso on the coefficients, basis and coefficients in alternation; last epoch kept"),
    Stage("prune", ("retrain",), ("prune", "data.image_size"), run_prune, False,  # channel costs: MACs at this size
          ("model.safetensors", "sparsity.json"), ("channels.json", "compress_steps.json", "compression_curve.png",
                                                "fallbacks.json", "fallback_*.safetensors"),
          "zero whole channels to a dense-MAC target (or, with compress.max_top1_drop, in fine-tuned steps within "
          "that budget) and/or small coefficients; masks held from here on",
          reads_also=("baseline",), trains_when="compress.max_top1_drop",
          when_training=("compress", "finetune", "data", "seed")),
    Stage("finetune", ("prune", "baseline"), ("finetune", "data", "seed"), run_finetune, True,
          ("model.safetensors", "history.json"), (),
          "recover accuracy with the masks held (optionally distilled from the baseline); best epoch kept"),
    Stage("shrink", ("finetune",), ("shrink",), run_shrink, False,
          ("model.safetensors", "recipe.json", "structure.md", "structure_before.csv", "structure_after.csv"), (),
          "drop dead channels and bases, exactly; the before/after structure table"),
    Stage("evaluate", ("baseline", "shrink"), ("evaluate", "data"), run_evaluate, False,
          ("evaluation.json", "compressed.safetensors", "inference_plan_bs*.md"), ("baseline.onnx", "compressed.onnx"),
          "test accuracy, parameters, MACs and latency of baseline and compressed model"),
    Stage("report", ("baseline", "decompose", "retrain", "prune", "finetune", "shrink", "evaluate"), (),
          run_report, False, ("structure.md", "summary.md", "evaluation.json"),
          ("coefficients.png", "reconstructed_weights.png", "learning_curves.png", "compression_curve.png"),
          "pictures, learning curves and the summary table"),
)

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
#: Config values (dotted keys, sections or single fields) each stage's fingerprint hashes.
STAGE_DEPENDENCIES: dict[str, tuple[str, ...]] = {s.name: s.config for s in STAGE_TABLE}
STAGE_INPUTS: dict[str, tuple[str, ...]] = {s.name: s.inputs for s in STAGE_TABLE}
#: Every stage whose committed outputs a stage reads (its inputs, then ``reads_also``).
STAGE_READS: dict[str, tuple[str, ...]] = {s.name: s.inputs + s.reads_also for s in STAGE_TABLE}
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE if s.trains)


def stage(name: str) -> Stage:
    """The table entry of ``name`` (a clear error for an unknown stage)."""
    for entry in STAGE_TABLE:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def stage_function(name: str) -> Callable[..., dict]:
    """The function that runs stage ``name``."""
    return stage(name).function


def markdown_table() -> str:
    """The table as Markdown, for docs/DESIGN.md."""
    lines = ["| stage | reads | config | trains | writes | does |", "|---|---|---|---|---|---|"]
    for s in STAGE_TABLE:
        writes = ", ".join(s.writes) + (f" (sometimes {', '.join(s.may_write)})" if s.may_write else "")
        config = ", ".join(s.config) + (f" (while {s.trains_when} is set: {', '.join(s.when_training)})"
                                        if s.when_training else "")
        trains = "yes" if s.trains else (f"while {s.trains_when} is set" if s.trains_when else "no")
        lines.append(f"| {s.name} | {', '.join(s.inputs + s.reads_also) or '-'} | {config or '-'} | "
                     f"{trains} | {writes} | {s.does} |")
    return "\n".join(lines) + "\n"


def _check_table() -> None:
    """Names unique, every input an earlier stage (the table order is the run order)."""
    seen: set[str] = set()
    for s in STAGE_TABLE:
        if s.name in seen:
            raise ValueError(f"stage {s.name!r} is in the stage table twice")
        late = [i for i in s.inputs + s.reads_also if i not in seen]
        if late:
            raise ValueError(f"stage {s.name!r} reads {', '.join(late)}, which must come before it in the table")
        seen.add(s.name)


_check_table()
