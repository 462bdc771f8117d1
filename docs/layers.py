"""The layers of penni/ and pipeline/, bottom first: a module may import from its own layer and the layers below.

docs/generate_design.py writes this table into docs/DESIGN.md; tests/pipeline/test_layers.py fails on an import
that goes up it and on any import cycle. An entry names a module or a package (the package's modules with it).
"""
from __future__ import annotations

#: (layer name, what it is for, the modules and packages in it), bottom first. All of penni/ is below pipeline/.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("penni core", "the decomposed conv, held masks, the recipe of architecture edits, penalties, slicing",
     ("penni.conv", "penni.masking", "penni.unwrap", "penni.recipe", "penni.regularization", "penni.slicing")),
    ("penni analysis", "what is coupled, what it costs, how it runs; decomposition and the alternating schedule",
     ("penni.dependency", "penni.decomposition", "penni.schedule", "penni.profiling", "penni.comparison",
      "penni.inference", "penni.export", "penni.latency", "penni.visualize")),
    ("penni compression", "pruning coefficients and channels, shrinking the network",
     ("penni.pruning", "penni.channel_pruning", "penni.shrinking")),
    ("penni serialization", "files: safetensors plus a JSON recipe replayed on load, the factory registry",
     ("penni.serialization",)),
    ("penni models", "the built-in architectures, registered as factories", ("penni.models",)),
    ("penni API", "the package's public API (one __all__)", ("penni",)),
    ("pipeline base", "the config, the console and the errors every layer above uses",
     ("pipeline", "pipeline.config", "pipeline.console", "pipeline.errors")),
    ("pipeline storage and data", "run storage (local or a URI), locks, canonical JSON; datasets and loaders",
     ("pipeline.storage", "pipeline.data")),
    ("pipeline tracking", "MLflow runs, URIs, metric names, the UI link, the logged model", ("pipeline.tracking",)),
    ("pipeline training", "the training loop, its worlds (in-process or Ray Train), checkpoints",
     ("pipeline.training",)),
    ("pipeline stages", "the stage table, the stage functions, fingerprints, the DAG", ("pipeline.stages",)),
    ("pipeline cli", "the runner and the launch of a run", ("pipeline.cli",)),
    ("pipeline sweep", "Ray Tune sweeps over pipeline runs", ("pipeline.sweep",)),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific entry that contains ``module``."""
    best, best_len = -1, -1
    for index, (_, _, members) in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best_len:
                best, best_len = index, len(member)
    if best < 0:
        raise LookupError(f"module {module} is in no layer of docs/layers.py: add it to the layer it belongs to")
    return best
