"""Hostile checkpoint files: ``penni.load`` refuses each with PenniFormatError and never runs code.

Every hostile file starts as a real ``penni.save`` file of a small decomposed, sliced and pruned
model whose ``penni_recipe`` metadata (or tensors, or raw header bytes) is then rewritten. The
payloads try to create a sentinel file; each test checks that it never appears.
"""
from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import penni
from penni.models import build_model
from penni.recipe import get_recipe, set_constructor
from penni.serialization.format import MAX_HEADER_BYTES, MAX_RECIPE_BYTES, load, save
from penni.serialization.tensors import PenniFormatError
from penni.slicing import slice_in, slice_out, slice_penni_basis
from tests.helpers import randomize_batchnorm

MB = 2**20


def make_sentinel(path: str = "", command: str = "", **kwargs: Any) -> nn.Module:
    """A factory that is never registered: if load ever called it, the sentinel would appear."""
    Path(path or command.split()[-1]).touch()
    return nn.Linear(1, 1)


def small_model() -> nn.Module:
    """fashion_cnn with narrow widths, decomposed, hand-sliced (so ``kept`` exists) and pruned."""
    torch.manual_seed(0)
    model = build_model("fashion_cnn", in_channels=1, widths=[6, 8, 8])
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    recipe = get_recipe(model)
    for layer, axis in [("features.conv1_2", "out"), ("features.bn1_2", "out"), ("features.conv2_1", "in")]:
        (slice_out if axis == "out" else slice_in)(model.get_submodule(layer), [0, 2, 3])
        recipe.record_kept(layer, axis, [0, 2, 3])
    slice_penni_basis(model.features.conv2_2, torch.tensor([1, 3]))
    recipe.record_kept("features.conv2_2", "basis", [1, 3])
    penni.prune(model, rule="std", s=1.0)
    return model.eval()


@dataclass
class Base:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def recipe(self) -> dict[str, Any]:
        return json.loads(self.metadata["penni_recipe"])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save(small_model(), path)
    with safe_open(str(path), framework="pt") as f:
        return Base({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata()))


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def write_raw_header(path: Path, header: bytes, data: bytes = b"\0\0\0\0") -> None:
    """A safetensors file written by hand: 8-byte little-endian header length, header, data."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data)


# ---------------------------------------------------------------------------------- recipe edits

Edit = Callable[[dict, str], dict]


def with_factory(factory: str, kwargs: Callable[[str], dict] | None = None) -> Edit:
    """The base recipe with its constructor replaced."""
    def edit(recipe: dict, sentinel: str) -> dict:
        recipe["constructor"] = {"factory": factory,
                                 "kwargs": kwargs(sentinel) if kwargs else {"command": f"touch {sentinel}"}}
        return recipe
    return edit


def with_kwargs(**changes: Any) -> Edit:
    """The base recipe with its (registered) constructor's kwargs changed; "$S" is the sentinel path."""
    def edit(recipe: dict, sentinel: str) -> dict:
        kwargs = recipe["constructor"]["kwargs"]
        kwargs.update(json.loads(json.dumps(changes).replace("$S", sentinel)))
        return recipe
    return edit


def with_field(key: str, value: Any, merge: bool = False) -> Edit:
    def edit(recipe: dict, sentinel: str) -> dict:
        recipe[key] = {**recipe[key], **value} if merge else value
        return recipe
    return edit


def touch(sentinel: str) -> dict:
    return {"args": ["touch", sentinel]}


CODE = "__import__('os').system('touch {}')"

FACTORY_PATHS: dict[str, Edit] = {
    "os.system": with_factory("os:system"),
    "posix.system": with_factory("posix:system"),
    "subprocess.run": with_factory("subprocess:run", touch),
    "subprocess.Popen": with_factory("subprocess:Popen", touch),
    "subprocess.check_call": with_factory("subprocess:check_call", touch),
    "builtins.eval": with_factory("builtins:eval", lambda s: {"source": CODE.format(s)}),
    "builtins.exec": with_factory("builtins:exec", lambda s: {"source": CODE.format(s)}),
    "builtins.__import__": with_factory("builtins:__import__", lambda s: {"name": "os"}),
    "importlib.import_module": with_factory("importlib:import_module", lambda s: {"name": "os"}),
    "penni.serialization:os.system": with_factory("penni.serialization:os.system"),
    "torchvision.models.resnet:torch.hub.os.system": with_factory("torchvision.models.resnet:torch.hub.os.system"),
    "penni.models:torch.load": with_factory("penni.models:torch.load", lambda s: {"f": s, "weights_only": False}),
    "get_model.__globals__": with_factory("torchvision.models:get_model.__globals__.os.system"),
    "build_model.__globals__": with_factory("penni.models:build_model.__globals__"),
    "__builtins__": with_factory("penni.models:__builtins__"),
    "dunder class chain": with_factory("penni.models:build_model.__class__.__base__"),
    "builtins.getattr": with_factory("builtins:getattr", lambda s: {"name": "system"}),
    "operator.attrgetter": with_factory("operator:attrgetter", lambda s: {"attr": "system"}),
    "torchvision.models:get_model": with_factory("torchvision.models:get_model", lambda s: {"name": "resnet18"}),
    "torchvision.models:list_models": with_factory("torchvision.models:list_models", lambda s: {}),
    "torchvision submodule attribute": with_factory("torchvision.models.resnet:torch", lambda s: {}),
    "torchvision name of a non-model": with_factory("torchvision.models:utils", lambda s: {}),
    "torchvision other package": with_factory("torchvision.datasets:MNIST", lambda s: {"root": s}),
    "torchvision model in the wrong module": with_factory("torchvision.models.vgg:resnet18", lambda s: {}),
    "penni non-factory function": with_factory("penni.models:load_weights", lambda s: {"model": None, "path": s}),
    "penni.serialization.factories:register_factory": with_factory("penni.serialization.factories:register_factory",
                                                     lambda s: {"name": "os:system", "fn": None}),
    "unregistered sentinel factory": with_factory(f"{__name__}:make_sentinel", lambda s: {"path": s}),
    "tests.test_hostile_files path": with_factory("tests.test_hostile_files:make_sentinel", lambda s: {"path": s}),
    "no colon": with_factory("os.system"),
    "empty factory": with_factory(""),
    "factory with spaces": with_factory("os: system"),
    "factory with path": with_factory("../../os:system"),
}

SMUGGLED_KWARGS: dict[str, Edit] = {
    "arch names a dotted path": with_kwargs(arch="os.system"),
    "arch names torchvision:os.system": with_kwargs(arch="torchvision:os.system"),
    "arch names a torchvision module path": with_kwargs(arch="torchvision:resnet.torch.hub.os.system"),
    "string where a callable goes": with_kwargs(norm_layer="os.system"),
    "object-like dict": with_kwargs(num_classes={"__reduce__": ["os.system", ["touch $S"]]}),
    "py/object dict": with_kwargs(widths={"py/object": "os.system", "command": "touch $S"}),
    "dunder kwarg name": with_kwargs(__class__="os.system"),
    "kwarg name not an identifier": with_kwargs(**{"a b": 1}),
    "kwarg name with a dot": with_kwargs(**{"os.system": "touch $S"}),
    "unknown kwarg": with_kwargs(command="touch $S"),
    "nested too deep": with_kwargs(widths=json.loads("[" * 40 + "]" * 40)),
    "int beyond int64": with_kwargs(num_classes=10**30),
    "torchvision arch with pretrained weights": with_kwargs(arch="torchvision:resnet18", weights="DEFAULT"),
    "backbone weights to download": with_kwargs(weights_backbone="DEFAULT"),
    "torchvision builder with pretrained weights": lambda r, s: {
        **r, "constructor": {"factory": "torchvision.models:resnet18", "kwargs": {"weights": "DEFAULT"}}},
}

SIZES: dict[str, Edit] = {
    "num_classes 10**12": with_kwargs(num_classes=10**12),
    "num_classes 10**9 hidden behind slicing": lambda r, s: with_field(
        "kept", {"classifier": {"out": list(range(10))}}, merge=True)(with_kwargs(num_classes=10**9)(r, s), s),
    "widths 10**6": with_kwargs(widths=[10**6, 10**6, 10**6]),
    "num_classes negative": with_kwargs(num_classes=-1),
    "num_classes zero": with_kwargs(num_classes=0),
    "widths negative": with_kwargs(widths=[-6, 8, 8]),
    "in_channels negative": with_kwargs(in_channels=-3),
    "num_classes a float": with_kwargs(num_classes=10.5),
    "num_classes a string": with_kwargs(num_classes="10"),
    "num_classes a bool": with_kwargs(num_classes=True),
    "widths a string": with_kwargs(widths="688"),
}


def with_decomposed(layer: str, d: Any) -> Edit:
    return with_field("decomposed", {layer: d}, merge=True)


def with_kept(layer: str, axes: Any) -> Edit:
    return with_field("kept", {layer: axes}, merge=True)


LAYERS: dict[str, Edit] = {
    "d zero": with_decomposed("features.conv1_1", 0),
    "d negative": with_decomposed("features.conv1_1", -5),
    "d huge": with_decomposed("features.conv1_1", 10**6),
    "d above kh*kw": with_decomposed("features.conv1_1", 10),
    "d a float": with_decomposed("features.conv1_1", 5.0),
    "d a bool": with_decomposed("features.conv1_1", True),
    "d a string": with_decomposed("features.conv1_1", "5"),
    "decompose a missing layer": with_decomposed("features.nope", 5),
    "decompose a BatchNorm": with_decomposed("features.bn1_1", 5),
    "decompose a Linear": with_decomposed("classifier", 5),
    "decompose a glob": with_decomposed("*", 5),
    "decompose 'default'": with_decomposed("default", 5),
    "decompose a dunder path": with_decomposed("features.conv1_1.__class__", 5),
    "decompose an empty name": with_decomposed("", 5),
    "decompose a name with a slash": with_decomposed("../features", 5),
    "slice a missing layer": with_kept("features.nope", {"out": [0]}),
    "slice a dunder path": with_kept("features.__class__", {"out": [0]}),
    "kept out of range": with_kept("features.conv1_2", {"out": [0, 2, 99]}),
    "kept negative": with_kept("features.conv1_2", {"out": [-1, 0, 2]}),
    "kept duplicated": with_kept("features.conv1_2", {"out": [0, 0, 2]}),
    "kept unsorted": with_kept("features.conv1_2", {"out": [3, 2, 0]}),
    "kept huge index": with_kept("features.conv1_2", {"out": [0, 2, 2**40]}),
    "kept basis out of range": with_kept("features.conv2_2", {"basis": [1, 7]}),
    "kept basis of a Linear": with_kept("classifier", {"basis": [0]}),
    "kept unknown axis": with_kept("features.conv1_2", {"weight": [0]}),
    "kept a dict of ints": with_kept("features.conv1_2", {"out": {"0": 1}}),
    "kept floats": with_kept("features.conv1_2", {"out": [0.0, 2.0, 3.0]}),
    "kept bools": with_kept("features.conv1_2", {"out": [False, True]}),
    "kept a string": with_kept("features.conv1_2", "out"),
    "kept of a ReLU": with_kept("features.relu1_1", {"out": [0]}),
    "added bias to a missing layer": with_field("added_bias", ["features.nope"]),
    "added bias to a ReLU": with_field("added_bias", ["features.relu1_1"]),
    "added bias twice": with_field("added_bias", ["classifier", "classifier"]),
    "added bias not a list": with_field("added_bias", "classifier"),
}

WRONG_TYPES: dict[str, Edit] = {
    "constructor a string": with_field("constructor", "os:system"),
    "constructor a list": with_field("constructor", ["os:system", {"command": "touch"}]),
    "constructor null": with_field("constructor", None),
    "constructor extra key": lambda r, s: {**r, "constructor": {**r["constructor"], "module": "os"}},
    "constructor without kwargs": lambda r, s: {**r, "constructor": {"factory": r["constructor"]["factory"]}},
    "kwargs a list": lambda r, s: {**r, "constructor": {**r["constructor"], "kwargs": ["touch", s]}},
    "factory an int": lambda r, s: {**r, "constructor": {**r["constructor"], "factory": 7}},
    "decomposed a list": with_field("decomposed", [["features.conv1_1", 5]]),
    "kept a list": with_field("kept", [1, 2]),
    "version 99": with_field("version", 99),
    "version a string": with_field("version", "1"),
    "unknown top-level field": with_field("evil", {"factory": "os:system"}),
    "recipe a list": lambda r, s: [r],
    "recipe null": lambda r, s: None,
}

RECIPE_EDITS = {**FACTORY_PATHS, **SMUGGLED_KWARGS, **SIZES, **LAYERS, **WRONG_TYPES}


@pytest.mark.parametrize("edit", list(RECIPE_EDITS.values()), ids=list(RECIPE_EDITS))
def test_hostile_recipe_is_refused(tmp_path, base, edit):
    sentinel = tmp_path / "sentinel"
    recipe = edit(copy.deepcopy(base.recipe), str(sentinel))
    path = tmp_path / "hostile.safetensors"
    write(path, base.tensors, {**base.metadata, "penni_recipe": json.dumps(recipe)})
    with pytest.raises(PenniFormatError):
        load(path)
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.safetensors"]


# ---------------------------------------------------------------------------------- whole-file edits


def tensors_edit(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable:
    def make(path: Path, base: Base, sentinel: str) -> None:
        tensors = dict(base.tensors)
        change(tensors)
        write(path, tensors, base.metadata)
    return make


def metadata_edit(**changes: str) -> Callable:
    def make(path: Path, base: Base, sentinel: str) -> None:
        write(path, base.tensors, {**base.metadata, **{k: v.replace("$S", sentinel) for k, v in changes.items()}})
    return make


def raw_recipe(text: bytes) -> Callable:
    """A hand-written header whose penni_recipe is ``text`` (bytes, not necessarily UTF-8 or JSON)."""
    def make(path: Path, base: Base, sentinel: str) -> None:
        header = (b'{"__metadata__":{"penni_format":"1","penni_recipe":"' + text + b'"},'
                  b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
        write_raw_header(path, header)
    return make


def huge_recipe(megabytes: int) -> Callable:
    """A valid recipe padded with spaces to ``megabytes``, streamed to disk (never held in memory twice)."""
    def make(path: Path, base: Base, sentinel: str) -> None:
        recipe = json.dumps(base.recipe).replace('"', '\\"').encode()
        index = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in ["x"]})[1:-1].encode()
        head = b'{"__metadata__":{"penni_format":"1","penni_recipe":"'
        tail = recipe + b'"},' + index + b"}"
        pad = megabytes * MB - len(head) - len(tail)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(head) + pad + len(tail)) + head)
            chunk = b" " * MB
            for _ in range(pad // MB):
                fh.write(chunk)
            fh.write(b" " * (pad % MB) + tail + b"\0\0\0\0")
    return make


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def reshape(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t[key] = torch.zeros(shape)
    return change


FILE_EDITS: dict[str, Callable] = {
    "tensor of the wrong shape": tensors_edit(reshape("classifier.weight", (10, 9))),
    "tensor of a sliced layer at full width": tensors_edit(reshape("features.bn1_2.weight", (6,))),
    "basis of the wrong d": tensors_edit(reshape("features.conv2_2.basis", (5, 3, 3))),
    "tensor missing": tensors_edit(drop("classifier.bias")),
    "extra tensor": tensors_edit(lambda t: t.update({"evil.weight": torch.zeros(3)})),
    "mask without a tensor": tensors_edit(lambda t: t.update({"evil.weight::mask": torch.zeros(3)})),
    "no tensors at all": tensors_edit(lambda t: t.clear()),
    "recipe 100 MB": huge_recipe(100),
    "recipe just over the cap": huge_recipe(MAX_RECIPE_BYTES // MB + 1),
    "recipe not UTF-8": raw_recipe(b"{\xff\xfe\x80 \xc3\x28}"),
    "recipe with a lone surrogate escape": raw_recipe(b'{\\"version\\": \\"\\\\udc80\\"}'),
    "recipe not JSON": metadata_edit(penni_recipe="import os; os.system('touch $S')"),
    "recipe empty": metadata_edit(penni_recipe=""),
    "recipe truncated": metadata_edit(penni_recipe='{"constructor": {"factory": "penni.models:build_model"'),
    "recipe with NaN": metadata_edit(penni_recipe='{"version": NaN}'),
    "recipe nested 100000 deep": metadata_edit(penni_recipe=deep_json(100_000)),
    "recipe repeats a key": metadata_edit(penni_recipe='{"version": 1, "version": 1}'),
    "forward mode names a function": metadata_edit(penni_forward_modes='{"features.conv1_1": "os.system"}'),
    "forward modes not JSON": metadata_edit(penni_forward_modes="os.system('touch $S')"),
    "forward modes of a dunder path": metadata_edit(penni_forward_modes='{"__class__": "dense"}'),
    "penni format 2": metadata_edit(penni_format="2"),
    "metadata header not UTF-8": lambda path, base, s: write_raw_header(
        path, b'{"__metadata__":{"\xff":"1"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
    "header length past the end": lambda path, base, s: path.write_bytes(
        struct.pack("<Q", 10**12) + b'{"__metadata__":{}}'),
    "header declares a huge tensor": lambda path, base, s: write_raw_header(
        path, b'{"x":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}'),
}


@pytest.mark.parametrize("make", list(FILE_EDITS.values()), ids=list(FILE_EDITS))
def test_hostile_file_is_refused(tmp_path, base, make):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "hostile.safetensors"
    make(path, base, str(sentinel))
    with pytest.raises(PenniFormatError):
        load(path)
    assert not sentinel.exists()


def test_oversized_header_is_refused_before_safetensors_reads_it(tmp_path, base):
    """penni's own cap (64 MiB) is below safetensors' (100 MB) and names the problem."""
    path = tmp_path / "hostile.safetensors"
    huge_recipe(MAX_HEADER_BYTES // MB + 1)(path, base, "")
    with pytest.raises(PenniFormatError, match="header is .* bytes, more than"):
        load(path)


def test_registered_factory_errors_are_wrapped(tmp_path, base):
    """Whatever a registered factory raises on hostile arguments reaches the caller as PenniFormatError."""
    def fragile(**kwargs: Any) -> nn.Module:
        raise KeyError("boom")

    path = tmp_path / "m.safetensors"
    recipe = {**base.recipe, "constructor": {"factory": "mine:fragile", "kwargs": {"x": 1}}}
    write(path, base.tensors, {**base.metadata, "penni_recipe": json.dumps(recipe)})
    with pytest.raises(PenniFormatError, match="mine:fragile"):
        load(path, factories={"mine:fragile": fragile})


def test_non_module_result_is_refused(tmp_path, base):
    path = tmp_path / "m.safetensors"
    recipe = {**base.recipe, "constructor": {"factory": "mine:number", "kwargs": {}}}
    write(path, base.tensors, {**base.metadata, "penni_recipe": json.dumps(recipe)})
    with pytest.raises(PenniFormatError, match="not a torch.nn.Module"):
        load(path, factories={"mine:number": lambda: 3})


# ---------------------------------------------------------------------------------- constructors that multiply modules


def _many_blocks_file(path: Path, factory: str, kwargs: dict) -> None:
    """A small real file (mobilenet_v2 at width 0.1) whose recipe asks its constructor for far more modules."""
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.1, num_classes=4).eval()
    set_constructor(model, "torchvision.models:mobilenet_v2", width_mult=0.1, num_classes=4)
    save(model, path)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    recipe = json.loads(metadata["penni_recipe"])
    recipe["constructor"] = {"factory": factory, "kwargs": kwargs}
    write(path, tensors, {**metadata, "penni_recipe": json.dumps(recipe)})


DEEP_CONSTRUCTORS = {  # each passes the tensor-byte budget (every tensor is tiny) but builds 10^5-10^6 modules
    "torchvision mobilenet_v2, 200k blocks": ("torchvision.models:mobilenet_v2",
                                              {"width_mult": 0.1, "inverted_residual_setting": [[1, 16, 200000, 1]]}),
    "penni build_model over torchvision, 200k blocks": (
        "penni.models:build_model", {"arch": "torchvision.models:mobilenet_v2", "num_classes": 4,
                                     "inverted_residual_setting": [[6, 8, 200000, 1]]}),
    "registered factory, 10^6 modules": ("mine:deep", {"depth": 1_000_000}),
}


def _deep(depth: int) -> nn.Module:
    return nn.Sequential(*(nn.Sequential(nn.Identity(), nn.ReLU()) for _ in range(depth)))


@pytest.mark.parametrize("factory,kwargs", list(DEEP_CONSTRUCTORS.values()), ids=list(DEEP_CONSTRUCTORS))
def test_a_constructor_that_multiplies_modules_is_refused_within_seconds(tmp_path, factory, kwargs):
    """A 1 KB recipe change must not pin gigabytes and minutes: the build is counted while it runs (on meta)."""
    import resource
    import time

    path = tmp_path / "deep.safetensors"
    _many_blocks_file(path, factory, kwargs)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(PenniFormatError, match="registers more than"):
        load(path, factories={"mine:deep": _deep})
    assert time.perf_counter() - started < 30  # < 5 s idle; generous for a loaded CI machine
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 1024, f"the refused load grew the process by {grown_mb:.0f} MB"


def test_a_slow_constructor_is_refused_at_the_time_limit(tmp_path, monkeypatch):
    from penni.serialization import replay

    def slow(**kwargs: Any) -> nn.Module:
        import time

        layers = nn.Sequential()
        while True:  # never finishes on its own
            time.sleep(0.01)
            layers.append(nn.Identity())

    monkeypatch.setattr(replay, "BUILD_SECONDS", 1.0)
    path = tmp_path / "slow.safetensors"
    _many_blocks_file(path, "mine:slow", {})
    with pytest.raises(PenniFormatError, match="took more than 1 s"):
        load(path, factories={"mine:slow": slow})


# ---------------------------------------------------------------------------------- constructors that cannot run on meta


def regnet_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(weights=None, num_classes=4)
    set_constructor(model, "torchvision.models:regnet_x_400mf", num_classes=4)
    path = tmp_path / "regnet.safetensors"
    save(model.eval(), path)
    return path, model


def test_constructor_that_needs_real_data_loads_and_is_bounded(tmp_path):
    """torchvision's RegNets cannot be built on meta: built for real, but within a byte budget."""
    with pytest.raises(Exception), torch.device("meta"):
        torchvision.models.regnet_x_400mf(weights=None)
    path, model = regnet_file(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), load(path).eval()(x))

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    recipe = json.loads(metadata["penni_recipe"])
    for num_classes in (10**12, -4):
        recipe["constructor"]["kwargs"]["num_classes"] = num_classes
        write(path, tensors, {**metadata, "penni_recipe": json.dumps(recipe)})
        with pytest.raises(PenniFormatError, match="refused the recipe's arguments"):
            load(path)


# ---------------------------------------------------------------------------------- normal files still load


def assert_loads_identically(model: nn.Module, path: Path, x: torch.Tensor, **load_kw: Any) -> nn.Module:
    model.eval()
    save(model, path, factories=load_kw.get("factories"))
    loaded = load(path, **load_kw).eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    return loaded


def test_penni_model_loads(tmp_path):
    assert_loads_identically(small_model(), tmp_path / "m.safetensors", torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("factory", ["torchvision.models:resnet18", "torchvision.models.resnet:resnet18"])
def test_torchvision_model_loads(tmp_path, factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    set_constructor(model, factory, num_classes=7)
    randomize_batchnorm(model)
    penni.decompose(model, d=4)
    penni.prune(model, rule="std", s=1.0)
    loaded = assert_loads_identically(model, tmp_path / "r.safetensors", torch.randn(1, 3, 32, 32))
    assert get_recipe(loaded).constructor["factory"] == factory


def test_build_model_torchvision_arch_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=5, in_channels=1)
    assert_loads_identically(model, tmp_path / "r.safetensors", torch.randn(1, 1, 32, 32))


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_user_registered_factory_loads(tmp_path):
    penni.register_factory("hostile_tests:tiny", Tiny, replace=True)
    torch.manual_seed(0)
    model = set_constructor(Tiny(width=6), "hostile_tests:tiny", width=6)
    penni.decompose(model, d=4)
    assert_loads_identically(model, tmp_path / "t.safetensors", torch.randn(2, 3, 8, 8))
    model = set_constructor(Tiny(width=6), "hostile_tests:unregistered_tiny", width=6)
    with pytest.raises(ValueError, match="register_factory"):
        save(model, tmp_path / "u.safetensors")
    assert_loads_identically(model, tmp_path / "u.safetensors", torch.randn(2, 3, 8, 8),
                             factories={"hostile_tests:unregistered_tiny": Tiny})


@pytest.mark.parametrize("kept", [[0, 16], [0, 10**6], list(range(20))], ids=["past the end", "huge", "too many"])
def test_pad_shortcut_indices_are_checked(tmp_path, kept):
    """A parameterless layer (ResNet-56's zero-padding shortcut) has no tensor shape to catch bad indices."""
    path = tmp_path / "r.safetensors"
    save(build_model("resnet56"), path)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    recipe = json.loads(metadata["penni_recipe"])
    recipe["kept"] = {"layer2.0.downsample": {"out": kept}}      # pads 8 + 8 zero channels
    write(path, tensors, {**metadata, "penni_recipe": json.dumps(recipe)})
    with pytest.raises(PenniFormatError, match="layer2.0.downsample"):
        load(path)
