"""Parquet image shards: writing them from an ImageFolder tree, and reading them by row.

A shard holds the encoded file bytes (column ``image``), the class index (``label``) and the path
inside the ImageFolder split (``path``); its schema metadata names the classes. Shards may live on a
local disk or behind any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["ParquetImageDataset", "decode_image", "is_uri", "list_shards", "open_shard", "write_parquet_shards"]

CLASSES_KEY = b"penni.classes"
SPLIT_KEY = b"penni.split"
MAKE_SHARDS_HINT = "write them with `python workflows/make_shards.py IMAGEFOLDER_ROOT OUT_DIR`"


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a pyarrow.fs URI rather than a local path."""
    return "://" in str(location)


def _filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(pathlib.Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # noqa: BLE001 - ArrowInvalid (unknown scheme), OSError (no credentials, no bucket)
        raise DataError(f"cannot open {location} ({type(e).__name__}: {e}); check the URI and the "
                        "storage credentials (standard AWS_* environment variables for s3://).") from None


def _join(location: str, name: str) -> str:
    """``location`` + ``/name``, keeping a URI's query string (e.g. ``?endpoint_override=...``) at the end."""
    base, sep, query = str(location).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def location_is_dir(location: str) -> bool:
    """Whether ``location`` (local path or URI) is an existing directory (for object stores: a prefix)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError:
        return False


def list_shards(location: str | os.PathLike) -> list[str]:
    """The ``*.parquet`` files directly in ``location``, sorted, as paths or URIs like ``location``."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(str(location))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise DataError(f"cannot list Parquet shard directory {location} ({e}).") from None
    names = sorted(pathlib.PurePosixPath(i.path).name for i in infos if i.type == pafs.FileType.File)
    names = [n for n in names if n.endswith(".parquet") and not n.startswith(".")]
    if not is_uri(location):
        return [str(pathlib.Path(path) / n) for n in names]
    return [_join(str(location), n) for n in names]


def open_shard(file: str):
    """A ``pyarrow.parquet.ParquetFile`` of a local path (memory-mapped) or a URI."""
    import pyarrow.parquet as pq

    if not is_uri(file):
        return pq.ParquetFile(file, memory_map=True)
    fs, path = _filesystem(file)
    return pq.ParquetFile(fs.open_input_file(path))


def decode_image(data: bytes, where: str):
    """Encoded image bytes as a PIL RGB image; undecodable bytes are a DataError naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode the image at {where} ({e}); re-write the shards.") from None


def _shard_files(source: Any) -> list[str]:
    """The shard files of a directory / URI ``source``, or the given list of files."""
    if isinstance(source, (str, os.PathLike)):
        if not is_uri(source) and not pathlib.Path(source).is_dir():
            raise DataError(f"Parquet shard directory {source} does not exist.")
        files = list_shards(source)
        if not files:
            raise DataError(f"no *.parquet shards in {source}; {MAKE_SHARDS_HINT}.")
        return files
    files = [str(f) for f in source]
    if not files:
        raise DataError("ParquetImageDataset needs at least one shard file.")
    return files


def _read_footer(f: str) -> tuple[list[str] | None, np.ndarray, list[int]]:
    """(classes named in the metadata or None, labels, rows per row group) of one shard."""
    try:
        pf = open_shard(f)
        schema = pf.schema_arrow
        for col in ("image", "label"):
            if col not in schema.names:
                raise DataError(f"shard {f} has no {col!r} column (columns: "
                                f"{schema.names}); it was not written by write_parquet_shards.")
        meta = schema.metadata or {}
        classes = json.loads(meta[CLASSES_KEY]) if CLASSES_KEY in meta else None
        labels = pf.read(columns=["label"]).column("label").to_numpy().astype(np.int64)
        md = pf.metadata
        return classes, labels, [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, JSON errors
        raise DataError(f"cannot read Parquet shard {f} ({type(e).__name__}: {e}); "
                        f"it is corrupt or not a shard, re-write it.") from None


def _row_index(rg_rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global row -> (file, row group, row in group), as compact numpy arrays."""
    file_of, group_of, row_of = [], [], []
    for fi, groups in enumerate(rg_rows):
        for gi, n in enumerate(groups):
            file_of.append(np.full(n, fi, np.int32))
            group_of.append(np.full(n, gi, np.int32))
            row_of.append(np.arange(n, dtype=np.int32))
    empty = np.empty(0, np.int32)
    return tuple(np.concatenate(a) if a else empty for a in (file_of, group_of, row_of))


class ParquetImageDataset(Dataset):
    """Encoded images in Parquet shards (columns ``image`` binary, ``label`` int64, ``path``).

    Only footers and the ``label`` column are read up front; images are read lazily, one row
    group at a time (an LRU of open files and one cached row group per process), so shard sets far
    larger than RAM work, on local disks (memory-mapped) or behind a pyarrow.fs URI. Items are
    ``(PIL RGB image, label)`` unless a ``transform`` is given.
    """

    max_open_files = 64

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike],
                 transform: Callable | None = None):
        self.files = _shard_files(source)
        self.transform = transform
        classes, labels, rg_rows = None, [], []
        for f in self.files:
            file_classes, lab, groups = _read_footer(f)
            if file_classes is not None and classes is not None and classes != file_classes:
                raise DataError(f"shard {f} lists different classes than {self.files[0]}; "
                                f"all shards of a dataset must come from one ImageFolder tree.")
            classes = classes if classes is not None else file_classes
            labels.append(lab)
            rg_rows.append(groups)
        self._labels = np.concatenate(labels) if labels else np.empty(0, np.int64)
        if classes is None:  # shards written elsewhere: derive names from the labels
            classes = [str(i) for i in range(int(self._labels.max()) + 1 if len(self._labels) else 0)]
        if len(self._labels) and (self._labels.min() < 0 or self._labels.max() >= len(classes)):
            raise DataError(f"labels in {source} fall outside 0..{len(classes) - 1} "
                            f"of the {len(classes)} classes in the shard metadata; re-write the shards.")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._file, self._group, self._row = _row_index(rg_rows)
        if len(self._file) != len(self._labels):
            raise DataError(f"row-group metadata and label column of {source} disagree; re-write the shards.")
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._cached_key: tuple[int, int] | None = None
        self._cached_images: Any = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_handles", "_cached_key", "_cached_images", "_pid"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    @property
    def targets(self) -> np.ndarray:
        """All labels, aligned with item order."""
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def row_groups(self, indices: np.ndarray) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
        """``indices`` grouped by row group: (file, row group, rows in the group, their labels)."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.lexsort((self._row[idx], self._group[idx], self._file[idx]))
        idx = idx[order]
        keys = self._file[idx].astype(np.int64) * (1 << 32) + self._group[idx]
        cuts = np.flatnonzero(np.diff(keys)) + 1
        return [(self.files[int(self._file[part[0]])], int(self._group[part[0]]),
                 self._row[part].astype(np.int64), self._labels[part]) for part in np.split(idx, cuts) if len(part)]

    def _row_group(self, fi: int, gi: int):
        if self._pid != os.getpid():  # forked worker: never share handles with the parent
            self._reset_cache()
        if self._cached_key == (fi, gi):
            return self._cached_images
        pf = self._handles.get(fi)
        if pf is None:
            pf = open_shard(self.files[fi])
            self._handles[fi] = pf
            while len(self._handles) > self.max_open_files:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(fi)
        images = pf.read_row_group(gi, columns=["image"]).column("image")
        self._cached_key, self._cached_images = (fi, gi), images
        return images

    def read_bytes(self, i: int) -> bytes:
        """The encoded image bytes of item ``i``."""
        if i < 0:
            i += len(self)
        fi, gi, ri = int(self._file[i]), int(self._group[i]), int(self._row[i])
        return self._row_group(fi, gi)[ri].as_py()

    def __getitem__(self, i: int) -> tuple[Any, int]:
        i = int(i)
        img = decode_image(self.read_bytes(i), f"row {i} of {self.files[int(self._file[i])]}")
        return (self.transform(img) if self.transform is not None else img), int(self._labels[i])


def _shard_jobs(src: pathlib.Path, split_name: str | None) -> list[tuple[pathlib.Path, str]]:
    """(ImageFolder split directory, split name) pairs to convert."""
    if split_name is None:
        for sub in ("train", "val"):
            if not (src / sub).is_dir():
                raise DataError(f"{src} has no {sub}/ directory; expected an ImageFolder tree "
                                f"root/train/<class>/* and root/val/<class>/* (or convert a "
                                f"single split with split_name / --split).")
        return [(src / "train", "train"), (src / "val", "val")]
    if not split_name or "/" in split_name or split_name.startswith("."):
        raise DataError(f"split_name={split_name!r} must be a plain directory name.")
    return [(src, split_name)]


def _plan_split(split_dir: pathlib.Path, name: str, out: pathlib.Path, overwrite: bool) -> dict:
    """What converting one split means: its classes, samples, target directory and old shards."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{split_dir} is not a usable ImageFolder split ({e}).") from None
    target = out / name
    existing = sorted(target.glob("*.parquet")) if target.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{target} already holds {len(existing)} shard(s); remove them or "
                        f"pass overwrite=True (--overwrite).")
    return dict(split_dir=split_dir, name=name, classes=classes, samples=samples, target=target,
                existing=existing)


def _read_checked(path: str) -> bytes:
    """The bytes of an image file, after checking that its header parses."""
    from PIL import Image, UnidentifiedImageError

    data = pathlib.Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)):  # header only: catches non-images early
            pass
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path} is not a readable image ({e}); remove or fix it.") from None
    return data


def _write_shard(chunk: list, split_dir: pathlib.Path, schema: Any, final: pathlib.Path,
                 row_group_bytes: int) -> None:
    """Write one shard atomically (temporary name, then rename), row groups of about ``row_group_bytes``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [_read_checked(path) for path, _ in chunk]
    table = pa.Table.from_pydict(
        {"image": images, "label": [lab for _, lab in chunk],
         "path": [os.path.relpath(p, split_dir) for p, _ in chunk]}, schema=schema)
    mean_bytes = max(1, sum(map(len, images)) // max(1, len(images)))
    row_group = max(1, min(len(chunk), row_group_bytes // mean_bytes))
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, row_group_size=row_group,
                       compression={"image": "NONE", "label": "ZSTD", "path": "ZSTD"},
                       use_dictionary=["label", "path"], write_statistics=["label"])
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_shards(image_folder: str | os.PathLike, out_dir: str | os.PathLike,
                         rows_per_shard: int = 1000, split_name: str | None = None,
                         overwrite: bool = False, row_group_bytes: int = 1 << 20) -> list[str]:
    """Convert an ImageFolder tree to Parquet shards, keeping the encoded file bytes as they are.

    Without ``split_name``: ``image_folder/{train,val}`` -> ``out_dir/{train,val}/*.parquet``.
    With ``split_name``: ``image_folder`` is one split (class sub-directories) written to
    ``out_dir/split_name``. Rows keep ImageFolder order; row groups hold about
    ``row_group_bytes`` so random access reads little. Each shard is written atomically.
    """
    import pyarrow as pa

    if int(rows_per_shard) <= 0:
        raise DataError(f"rows_per_shard={rows_per_shard} must be a positive integer.")
    src = pathlib.Path(image_folder).expanduser()
    out = pathlib.Path(out_dir).expanduser()
    if not src.is_dir():
        raise DataError(f"ImageFolder root {src} does not exist or is not a directory.")
    plans = [_plan_split(d, name, out, overwrite) for d, name in _shard_jobs(src, split_name)]
    written: list[str] = []
    for p in plans:
        p["target"].mkdir(parents=True, exist_ok=True)
        for old in p["existing"]:
            old.unlink()
        meta = {CLASSES_KEY: json.dumps(list(p["classes"])).encode(), SPLIT_KEY: p["name"].encode()}
        schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())],
                           metadata=meta)
        samples = p["samples"]
        n_shards = (len(samples) + rows_per_shard - 1) // rows_per_shard
        for s in range(n_shards):
            final = p["target"] / f"{p['name']}-{s:05d}-of-{n_shards:05d}.parquet"
            _write_shard(samples[s * rows_per_shard:(s + 1) * rows_per_shard], p["split_dir"], schema,
                         final, row_group_bytes)
            written.append(str(final))
    return written
