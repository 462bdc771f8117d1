"""pipeline.storage: manifests, atomic commits, verification, URI storages (real pyarrow.fs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.storage.canonical import fingerprint
from pipeline.storage.fileio import (
    atomic_output_path,
    atomic_write_bytes,
    atomic_write_text,
    copy_and_hash,
    sha256_file,
)
from pipeline.storage.run_store import RunStore, StorageError


def _make_outputs(d: Path, payload: bytes = b"weights-v1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "metrics.json").write_text(json.dumps({"top1": 0.5}))
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "plot.txt").write_text("nested file")
    return d


def test_fingerprint_canonical_and_sha(tmp_path):
    assert fingerprint({"a": 1, "b": [1, 2]}, "x") == fingerprint({"b": [1, 2], "a": 1}, "x")
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": 1}, "x") != fingerprint("x", {"a": 1})
    assert len(fingerprint()) == 64
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_commit_and_is_complete(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r1")
    assert store.is_local
    assert store.root == str((tmp_path / "runs" / "r1").resolve())
    assert store.read_manifest("baseline") is None
    assert not store.is_complete("baseline", "fp1")

    work = _make_outputs(tmp_path / "work")
    m = store.commit_stage("baseline", work, "fp1", {"top1": 0.5, "nan": float("nan")}, {"k": 1})
    assert m["stage"] == "baseline" and m["fingerprint"] == "fp1"
    assert set(m["files"]) == {"model.safetensors", "metrics.json", "sub/plot.txt"}
    assert m["files"]["model.safetensors"]["sha256"] == sha256_file(work / "model.safetensors")
    assert m["files"]["model.safetensors"]["size"] == len(b"weights-v1")
    assert m["metrics"]["top1"] == 0.5 and m["metrics"]["nan"] is None
    assert m["extra"] == {"k": 1} and m["created"].endswith("+00:00")

    final = store.local_path("baseline")
    assert final == tmp_path.resolve() / "runs" / "r1" / "baseline"
    assert (final / "sub" / "plot.txt").read_text() == "nested file"
    on_disk = json.loads((final / "manifest.json").read_text())
    assert on_disk == store.read_manifest("baseline") == m
    assert store.is_complete("baseline", "fp1")
    assert store.verify("baseline", "fp1") is None
    # nothing temporary left beside the stage
    assert sorted(p.name for p in final.parent.iterdir()) == ["baseline"]


def test_modified_file_is_detected(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.commit_stage("prune", _make_outputs(tmp_path / "w"), "fp", {})
    f = store.local_path("prune") / "model.safetensors"
    f.write_bytes(b"weights-v2")  # same size, different content
    assert not store.is_complete("prune", "fp")
    reason = store.verify("prune", "fp")
    assert "corrupt" in reason and "model.safetensors" in reason and "re-run" in reason
    f.write_bytes(b"short")  # size change
    assert "size" in store.verify("prune", "fp")
    f.unlink()
    assert "missing" in store.verify("prune", "fp")
    assert not store.is_complete("prune", "fp")


def test_fingerprint_mismatch(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.commit_stage("decompose", _make_outputs(tmp_path / "w"), "fp-a", {})
    assert store.is_complete("decompose", "fp-a")
    assert not store.is_complete("decompose", "fp-b")
    assert "different configuration" in store.verify("decompose", "fp-b")


def test_corrupt_manifest_is_not_complete(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.commit_stage("s", _make_outputs(tmp_path / "w"), "fp", {})
    (store.local_path("s") / "manifest.json").write_text("{not json")
    assert store.read_manifest("s") is None
    assert not store.is_complete("s", "fp")


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
    store = RunStore(str(tmp_path), "r")
    root = Path(store.root)
    # simulated crash mid-commit: a tmp dir with a complete-looking manifest, no final dir
    crashed = root / "retrain.tmp-deadbeef0000"
    _make_outputs(crashed)
    (crashed / "manifest.json").write_text(
        json.dumps({"stage": "retrain", "fingerprint": "fp", "files": {}, "metrics": {}})
    )
    old = root / "retrain.old-cafe00000000"
    _make_outputs(old)
    other = root / "retrain2.tmp-aaaa"  # another stage's tmp must not be touched
    other.mkdir()
    assert store.read_manifest("retrain") is None
    assert not store.is_complete("retrain", "fp")

    store.commit_stage("retrain", _make_outputs(tmp_path / "w"), "fp", {"a": 1})
    assert not crashed.exists() and not old.exists()
    assert other.exists()
    assert store.is_complete("retrain", "fp")
    assert sorted(p.name for p in root.iterdir()) == ["retrain", "retrain2.tmp-aaaa"]


def test_commit_replaces_existing_stage(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.commit_stage("finetune", _make_outputs(tmp_path / "w1", b"one"), "fp1", {"v": 1})
    (store.local_path("finetune") / "stale_only_in_v1.txt").write_text("x")
    w2 = tmp_path / "w2"
    w2.mkdir()
    (w2 / "model.safetensors").write_bytes(b"two")
    (w2 / "manifest.json").write_text("{}")  # a stale manifest in the work dir is never copied
    m = store.commit_stage("finetune", w2, "fp2", {"v": 2})
    d = store.local_path("finetune")
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.safetensors"]
    assert (d / "model.safetensors").read_bytes() == b"two"
    assert set(m["files"]) == {"model.safetensors"}
    assert store.is_complete("finetune", "fp2") and not store.is_complete("finetune", "fp1")
    assert sorted(p.name for p in d.parent.iterdir()) == ["finetune"]


def test_fetch_local_returns_stage_dir(tmp_path):
    store = RunStore(str(tmp_path), "r")
    with pytest.raises(StorageError, match="run the 'shrink' stage first"):
        store.fetch_stage("shrink", tmp_path / "dest")
    store.commit_stage("shrink", _make_outputs(tmp_path / "w"), "fp", {})
    got = store.fetch_stage("shrink", tmp_path / "dest")
    assert got == store.local_path("shrink")
    assert not (tmp_path / "dest").exists()  # no copy on local storage


def test_invalidate_from(tmp_path):
    store = RunStore(str(tmp_path), "r")
    for s in ("a", "b", "c"):
        store.commit_stage(s, _make_outputs(tmp_path / f"w{s}"), f"fp{s}", {})
    store.invalidate_from(["b", "c", "never_ran"])
    assert store.is_complete("a", "fpa")
    assert store.read_manifest("b") is None and not store.is_complete("c", "fpc")
    assert (store.local_path("b") / "model.safetensors").exists()  # outputs kept, just not "done"


def test_run_state_json(tmp_path):
    store = RunStore(str(tmp_path), "r")
    assert store.read_json("pipeline.json") is None
    store.write_json_atomic("pipeline.json", {"mlflow_parent_run_id": "abc"})
    assert store.read_json("pipeline.json") == {"mlflow_parent_run_id": "abc"}
    store.write_json_atomic("pipeline.json", {"mlflow_parent_run_id": "def"})
    assert store.read_json("pipeline.json") == {"mlflow_parent_run_id": "def"}
    assert [p.name for p in Path(store.root).iterdir()] == ["pipeline.json"]
    with pytest.raises(StorageError):
        store.write_json_atomic("../escape.json", {})


def test_train_storage_local(tmp_path):
    store = RunStore(str(tmp_path), "r")
    path, fs = store.train_storage()
    assert fs is None and path == os.path.join(store.root, "_train") and os.path.isabs(path)


def test_file_uri_storage(tmp_path):
    uri = (tmp_path / "uri_runs").as_uri()  # file:///...
    store = RunStore(uri, "r")
    assert store.is_local
    assert store.root == uri + "/r"
    assert store.stage_uri("baseline") == uri + "/r/baseline"
    store.commit_stage("baseline", _make_outputs(tmp_path / "w"), "fp", {"x": 1.0})
    assert (tmp_path / "uri_runs" / "r" / "baseline" / "manifest.json").is_file()
    assert store.local_path("baseline") == tmp_path / "uri_runs" / "r" / "baseline"
    assert store.is_complete("baseline", "fp")
    # a second store over the same URI sees it (durable, not in-memory)
    assert RunStore(uri, "r").is_complete("baseline", "fp")


def test_remote_filesystem_path_mock_uri(tmp_path):
    """The non-local code path (no renames, download + verify) over pyarrow's mock:// FS."""
    store = RunStore("mock:///bucket/prefix", "r")
    assert not store.is_local
    assert store.local_path("baseline") is None
    assert store.stage_uri("baseline") == "mock:///bucket/prefix/r/baseline"
    assert not store.is_complete("baseline", "fp")
    store.commit_stage("baseline", _make_outputs(tmp_path / "w1", b"one"), "fp", {"top1": 1})
    assert store.is_complete("baseline", "fp")
    # replace over an existing remote stage
    store.commit_stage("baseline", _make_outputs(tmp_path / "w2", b"two!"), "fp2", {"top1": 2})
    assert store.is_complete("baseline", "fp2") and not store.is_complete("baseline", "fp")
    names = {posixpath_name(i.path) for i in store.fs.get_file_info(pafs.FileSelector(store._p()))}
    assert names == {"baseline"}

    dest = store.fetch_stage("baseline", tmp_path / "dl")
    assert dest == tmp_path / "dl"
    assert (dest / "model.safetensors").read_bytes() == b"two!"
    assert (dest / "sub" / "plot.txt").read_text() == "nested file"
    assert json.loads((dest / "manifest.json").read_text())["fingerprint"] == "fp2"

    # remote corruption is detected both by is_complete and by fetch_stage
    with store.fs.open_output_stream(store._p("baseline", "model.safetensors")) as f:
        f.write(b"TWO!")
    assert not store.is_complete("baseline", "fp2")
    with pytest.raises(StorageError, match=r"output is corrupt: file 'model.safetensors' checksum"):
        store.fetch_stage("baseline", tmp_path / "dl2")

    store.write_json_atomic("pipeline.json", {"a": 1})
    assert store.read_json("pipeline.json") == {"a": 1}
    path, fs = store.train_storage()
    assert fs is store.fs and path == "bucket/prefix/r/_train"


def test_object_store_commit_writes_manifest_last(tmp_path):
    """Object stores (no atomic directory rename): files go straight into the stage directory and the
    manifest is written last; nothing is moved or copied; a commit that fails half-way leaves a stage
    that does not count as done, and the next commit replaces it."""
    inner = pafs._MockFileSystem()
    calls = []
    fail_on = []

    class Recording(pafs.FileSystemHandler):
        def __init__(self, fs):
            self.fs = fs

        def __eq__(self, other):
            return self is other

        def __ne__(self, other):
            return self is not other

        def get_type_name(self):
            return "recording"

        def normalize_path(self, path):
            return path

        def get_file_info(self, paths):
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return self.fs.get_file_info(selector)

        def create_dir(self, path, recursive):
            self.fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            calls.append(("delete_dir", path))
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            self.fs.delete_dir_contents("/", accept_root_dir=True)

        def delete_file(self, path):
            calls.append(("delete_file", path))
            self.fs.delete_file(path)

        def move(self, src, dest):
            calls.append(("move", dest))
            self.fs.move(src, dest)

        def copy_file(self, src, dest):
            calls.append(("copy", dest))
            self.fs.copy_file(src, dest)

        def open_input_stream(self, path):
            return self.fs.open_input_stream(path)

        def open_input_file(self, path):
            return self.fs.open_input_file(path)

        def open_output_stream(self, path, metadata):
            if any(part in path for part in fail_on):
                raise OSError(f"injected upload failure: {path}")
            calls.append(("write", path))
            return self.fs.open_output_stream(path)

        def open_append_stream(self, path, metadata):
            return self.fs.open_append_stream(path)

    fs = pafs.PyFileSystem(Recording(inner))
    store = RunStore("bucket/p", "r", filesystem=fs)
    assert not store.is_local
    store.commit_stage("prune", _make_outputs(tmp_path / "w"), "fp", {})
    writes = [path for op, path in calls if op == "write"]
    assert writes[-1] == "bucket/p/r/prune/manifest.json"  # manifest last
    assert sorted(writes[:-1]) == [f"bucket/p/r/prune/{n}" for n in ("metrics.json", "model.safetensors", "sub/plot.txt")]
    assert not [c for c in calls if c[0] in ("move", "copy")]
    assert store.is_complete("prune", "fp")

    calls.clear()
    fail_on.append("model.safetensors")  # a second commit dies half-way
    with pytest.raises(StorageError, match="committing stage 'prune'.*injected upload failure"):
        store.commit_stage("prune", _make_outputs(tmp_path / "w2", b"weights-v2"), "fp2", {})
    assert calls[0] == ("delete_file", "bucket/p/r/prune/manifest.json")  # the old output stops counting first
    assert store.read_manifest("prune") is None
    assert not store.is_complete("prune", "fp") and not store.is_complete("prune", "fp2")

    fail_on.clear()
    store.commit_stage("prune", _make_outputs(tmp_path / "w3", b"weights-v3"), "fp3", {})
    assert store.is_complete("prune", "fp3")
    names = {posixpath_name(i.path) for i in fs.get_file_info(pafs.FileSelector("bucket/p/r"))}
    assert names == {"prune"}


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "one")
    atomic_write_bytes(str(target), b"two")  # replaces
    assert target.read_bytes() == b"two"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_output_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"two"  # untouched by the failed writer
    with atomic_output_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"three")
    assert target.read_bytes() == b"three"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]  # no temporary left

    atomic_write_bytes("mock:///bucket/x/state.json", b"remote")  # a URI: one upload
    fs = pafs._MockFileSystem()
    atomic_write_bytes("b/state.json", b"on fs", filesystem=fs)
    with fs.open_input_stream("b/state.json") as f:
        assert f.read() == b"on fs"


def test_copy_and_hash_streams_once(tmp_path):
    import io

    src = tmp_path / "big"
    src.write_bytes(os.urandom(9 * 1024 * 1024 + 7))  # more than two chunks
    out = io.BytesIO()
    with open(src, "rb") as f:
        digest = copy_and_hash(f, out)
    assert out.getvalue() == src.read_bytes()
    assert (digest.sha256, digest.size) == (sha256_file(src), src.stat().st_size)


def test_unreachable_uri_message():
    with pytest.raises(StorageError, match="cannot open storage"):
        RunStore("nosuchscheme://bucket/x", "r")


def test_invalid_names(tmp_path):
    with pytest.raises(StorageError):
        RunStore(str(tmp_path), "a/b")
    store = RunStore(str(tmp_path), "r")
    with pytest.raises(StorageError):
        store.stage_uri("x.tmp-1")
    with pytest.raises(StorageError, match="not a directory"):
        store.commit_stage("s", tmp_path / "missing", "fp", {})


def posixpath_name(p: str) -> str:
    return p.rstrip("/").rsplit("/", 1)[-1]
