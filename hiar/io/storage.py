"""Teacher data (ODE pairs, trajectories) as Parquet shards on a local path or S3: layout, writing, reading.

Layout under a dataset URI (``/path/ds`` or ``s3://bucket/prefix``)::

    shard-00000.parquet   one row per sample, rows of samples [k * shard_size, (k + 1) * shard_size)
    shard-00001.parquet
    manifest.json          config hash, teacher checksum, schema version, counts, created-at

Why these choices:

* **Shards are the unit of work and of commit.** Sample i always lands in shard ``i // shard_size`` with seed
  ``sample_seed(global seed, kind, i)``, so a rerun recomputes exactly the missing shards. A shard exists under its
  final name only when it is complete: locally it is written under a temporary name and renamed; on S3 it is one
  PUT of the whole object (S3 makes an object visible atomically when its upload completes), so no rename is
  needed. A reader lists ``shard-*.parquet`` only, so it never sees half a shard.
* **Tensors as fixed-shape tensor columns** (Arrow's ``arrow.fixed_shape_tensor`` extension type, the same one Ray
  Data uses), stored as float16 by default: a sample's bytes are within a few percent of its raw fp16 size, and the
  shape and dtype are part of the schema, so a reader needs no side information.
* **S3 through an explicit ``pyarrow.fs.S3FileSystem``** configured from the environment (pyarrow ignores
  ``AWS_ENDPOINT_URL``, so we read it ourselves): ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:5000``),
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from hiar.identity import identity
from hiar.seeding import derive_seed

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("ode_pairs", "trajectories")
TENSOR_COLUMN = {"ode_pairs": "latents", "trajectories": "states"}
_DTYPES = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}


# ---------------------------------------------------------------------------------------------------- storage
# The directory that holds the ``hiar`` package: the repository root in a checkout, site-packages when installed.
# Shipped assets (the tiny teacher, ``hiar/assets/tiny-teacher``) are found under it either way.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> str:
    """URIs and absolute paths as they are; a relative path is taken from beside the installed ``hiar`` package
    when it exists there (shipped assets such as ``hiar/assets/tiny-teacher``), else from the working directory."""
    if "://" in path or os.path.isabs(path):
        return path
    candidate = PACKAGE_PARENT / path
    return str(candidate if candidate.exists() else Path(path).resolve())


def portable_path(path: str) -> str:
    """``path`` as identities hash it: resolved (:func:`resolve_path`), then relative to ``PACKAGE_PARENT`` when it
    lies under it, so a checkout's shipped teacher and its ``runs/`` name the same stage identity wherever the
    checkout is (``hiar/assets/tiny-teacher`` given relative or absolute alike); other paths and URIs as resolved."""
    if not path:
        return path
    resolved = resolve_path(path)
    if "://" in resolved:
        return resolved
    try:
        return Path(os.path.normpath(resolved)).relative_to(PACKAGE_PARENT).as_posix()
    except ValueError:
        return os.path.normpath(resolved)


def locatable_path(path: str | Path) -> str:
    """``path`` as a location another process may open later: a file of the installed ``hiar`` package (a shipped
    asset such as ``hiar/assets/tiny-teacher``) relative to ``PACKAGE_PARENT``, which :func:`resolve_path` maps to
    wherever the package is installed then; anything else absolute. A ``ray job submit`` job imports the package
    from Ray's per-session copy of the checkout, which is gone once the cluster stops, so an absolute path to a
    shipped asset written there would name nothing a day later."""
    resolved = Path(os.path.normpath(resolve_path(os.fspath(path))))
    try:
        return (Path("hiar") / resolved.relative_to(PACKAGE_PARENT / "hiar")).as_posix()
    except ValueError:
        return str(resolved)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from the environment; the endpoint override is what makes a local S3 server work."""
    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    kwargs["connect_timeout"] = float(os.environ.get("HIAR_S3_CONNECT_TIMEOUT", "5"))
    kwargs["request_timeout"] = float(os.environ.get("HIAR_S3_REQUEST_TIMEOUT", "30"))
    return pafs.S3FileSystem(**kwargs)


STORAGE_ENV = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_REGION", "AWS_DEFAULT_REGION", "HIAR_S3_CONNECT_TIMEOUT", "HIAR_S3_REQUEST_TIMEOUT")


def storage_env() -> dict[str, str]:
    """The storage variables set in this process, for workers that do not inherit it (Ray actors inherit the
    cluster's environment, not the job's). Passed through Ray's runtime_env, never logged or stored."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` for a local path or an ``s3://bucket/prefix`` URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def check_writable(uri: str) -> None:
    """Fail fast, before any compute, when the destination cannot be written (with the reason)."""
    fs, path = resolve_uri(uri)
    if isinstance(fs, pafs.S3FileSystem):
        bucket = path.split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as err:
            raise ValueError(f"cannot reach the S3 endpoint for {uri!r}: {err}") from err
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"S3 bucket {bucket!r} does not exist (from {uri!r})")
    probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # S3 has no directories: no marker objects
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise ValueError(f"cannot write to {uri!r}: {err}") from err


def write_json(fs: pafs.FileSystem, path: str, data: dict) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True).encode())


def write_local_json(path: str | Path, data) -> None:
    """``data`` as JSON at the local ``path``, atomically (a temporary file renamed into place: a reader never sees
    half a file), creating the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


# ---------------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardPlan:
    count: int
    shard_size: int

    def __post_init__(self):
        if self.count <= 0:
            raise ValueError(f"the number of samples must be > 0, got {self.count}")
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def samples(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def committed_shards(uri: str) -> set[int]:
    fs, path = resolve_uri(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    found = set()
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = info.base_name
        if name.startswith("shard-") and name.endswith(".parquet") and info.type == pafs.FileType.File:
            found.add(int(name[len("shard-"):-len(".parquet")]))
    return found


def complete_shards(uri: str, plan: ShardPlan, committed: set[int] | None = None) -> set[int]:
    """The shards of ``plan`` that ``uri`` holds whole: committed, with at least the plan's samples in them (from
    each file's Parquet footer). A dataset grows by sample index, so a last shard committed for a smaller count
    holds fewer samples than a larger count's plan puts there: it is not whole for that plan, and is made again.
    ``committed``: ``committed_shards(uri)`` when the caller has just listed them (one listing, not two)."""
    from concurrent.futures import ThreadPoolExecutor

    fs, path = resolve_uri(uri)

    def is_whole(shard: int) -> bool:
        with fs.open_input_file(f"{path}/{shard_name(shard)}") as f:
            return pq.read_metadata(f).num_rows >= len(plan.samples(shard))

    # Concurrent, because each footer is two requests on S3: 250 shards (Wan's 16k pairs) took 2.4 s one after
    # another against moto on 127.0.0.1, and a remote endpoint's latency multiplies that.
    committed = committed_shards(uri) if committed is None else committed
    shards = sorted(committed & set(range(plan.num_shards)))
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        return {shard for shard, whole in zip(shards, pool.map(is_whole, shards)) if whole}


def rows_to_table(rows: list[dict], tensor_column: str, dtype: str) -> pa.Table:
    """Scalars as plain columns; the tensor column as a fixed-shape tensor column of ``dtype``."""
    np_dtype = _DTYPES[dtype][0]
    arrays = np.stack([np.asarray(r[tensor_column], dtype=np_dtype) for r in rows])
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(np_dtype), arrays.shape[1:])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arrays.reshape(-1)), int(np.prod(arrays.shape[1:])))
    columns = {k: pa.array([r[k] for r in rows]) for k in rows[0] if k != tensor_column}
    columns[tensor_column] = pa.ExtensionArray.from_storage(tensor_type, storage)
    return pa.table(columns)


def write_shard(uri: str, shard: int, table: pa.Table) -> int:
    """Commit one shard; returns its size in bytes."""
    fs, path = resolve_uri(uri)
    final = f"{path}/{shard_name(shard)}"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)
        tmp = f"{path}/.{shard_name(shard)}.tmp-{uuid.uuid4().hex}"
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        os.replace(tmp, final)  # atomic on one filesystem
    else:
        pq.write_table(table, final, filesystem=fs, compression="zstd")  # one object, visible when complete
    return fs.get_file_info(final).size


# ---------------------------------------------------------------------------------------------------- manifest
def dataset_identity(kind: str, settings: dict, teacher_checksum: str) -> str:
    """What a dataset is (``hiar.identity.identity`` of its kind, settings, teacher and schema version)."""
    return identity({"kind": kind, "settings": settings, "teacher": teacher_checksum, "schema": SCHEMA_VERSION})


def load_manifest(uri: str) -> dict | None:
    fs, path = resolve_uri(uri)
    return read_json(fs, f"{path}/{MANIFEST}")


def write_manifest(uri: str, manifest: dict) -> None:
    fs, path = resolve_uri(uri)
    write_json(fs, f"{path}/{MANIFEST}", manifest)


# ---------------------------------------------------------------------------------------------------- reading
def read_rows(uri: str, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Every committed row, tensors as torch tensors with their stored shape and dtype, in sample order."""
    fs, path = resolve_uri(uri)
    shards = sorted(committed_shards(uri))
    if not shards:
        raise FileNotFoundError(f"no committed shards under {uri!r} (expected shard-*.parquet files)")
    for shard in shards:
        table = pq.read_table(f"{path}/{shard_name(shard)}", filesystem=fs, columns=columns)
        yield from table_rows(table)


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one ``[rows, *shape]`` array, whether Arrow's fixed-shape tensor type (our Parquet
    files) or Ray Data's own tensor extension type (what ``iter_batches(batch_format="pyarrow")`` may hand out)."""
    col = table.column(name).combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    return np.stack(col.to_numpy(zero_copy_only=False))


def table_rows(table: pa.Table) -> Iterator[dict]:
    cols = {}
    for name in table.column_names:
        if isinstance(table.schema.field(name).type, pa.FixedShapeTensorType):
            cols[name] = [torch.from_numpy(a.copy()) for a in tensor_column(table, name)]
        else:
            cols[name] = table.column(name).to_pylist()
    for i in range(table.num_rows):
        yield {k: v[i] for k, v in cols.items()}


def shard_paths(uri: str, plan: ShardPlan) -> tuple[pafs.FileSystem, list[str]]:
    """Filesystem and the paths of ``plan``'s shards, for ``ray.data.read_parquet(paths, filesystem=fs)``."""
    fs, path = resolve_uri(uri)
    return fs, [f"{path}/{shard_name(s)}" for s in range(plan.num_shards)]


def sample_seed(global_seed: int, kind: str, index: int) -> int:
    """The seed of sample ``index``: independent of sharding, batching and worker."""
    return derive_seed(global_seed, KINDS.index(kind), index)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------- fetching
FETCH_CACHE_ENV = "HIAR_CACHE_DIR"


def cache_root() -> Path:
    """Where fetched ``s3://`` directories live on this node: ``$HIAR_CACHE_DIR``, else ``~/.cache/hiar``."""
    return Path(os.environ.get(FETCH_CACHE_ENV) or Path.home() / ".cache" / "hiar").expanduser()


def local_dir(uri: str, what: str = "directory") -> Path:
    """A local directory holding the files under ``uri``: a local path as it is; an ``s3://bucket/prefix`` fetched
    once per node into the cache (``cache_root()/s3/<identity of the URI>``).

    A fetch lists every object under the prefix first (an empty prefix is an error naming ``what`` and the URI),
    downloads into a temporary directory, writes ``.hiar-fetch.json`` (the URI, each object's size and the sha256
    of its bytes) and renames the directory into place, so a cache entry is complete or absent: a fetch killed
    half-way leaves nothing that a later call would trust. A later call reuses the entry when its record still
    matches the listing (same keys and sizes), else fetches again.
    """
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} {uri!r} does not exist")
        return path
    fs, prefix = resolve_uri(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    except OSError as err:
        raise FileNotFoundError(f"cannot list {what} {uri!r}: {err}") from err
    objects = sorted((i.path[len(prefix):].lstrip("/"), i.size) for i in infos if i.type == pafs.FileType.File)
    if not objects:
        raise FileNotFoundError(f"{what} {uri!r}: no objects under this S3 prefix")
    key = identity(uri.rstrip("/"))
    final = cache_root() / "s3" / key
    record_name = ".hiar-fetch.json"
    listing = [[name, size] for name, size in objects]
    try:
        record = json.loads((final / record_name).read_text())
        if record.get("uri", "").rstrip("/") == uri.rstrip("/") and [[o[0], o[1]] for o in record.get("objects", [])] == listing:
            return final
    except (OSError, ValueError):
        pass
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex}"
    try:
        files = []
        for name, size in objects:
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with fs.open_input_stream(f"{prefix}/{name}") as src, open(dst, "wb") as out:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if dst.stat().st_size != size:
                raise OSError(f"{uri}/{name}: fetched {dst.stat().st_size} bytes, the listing said {size}")
            files.append([name, size, digest.hexdigest()])
        (tmp / record_name).write_text(json.dumps({"uri": uri.rstrip("/"), "objects": files, "fetched_at": now()}, indent=1))
        if final.exists():
            import shutil

            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tree_sha256(root: str | Path, parts: Sequence[str]) -> str:
    """sha256 (64 hex) over every file under ``root/<part>`` for each part (a folder or a file), names and bytes,
    in sorted order: the content identity of a shared model component (text encoder, VAE)."""
    h = hashlib.sha256()
    base = Path(root)
    files = []
    for part in parts:
        p = base / part
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise FileNotFoundError(f"no files under {str(base)!r} for {list(parts)}")
    for f in sorted(files):
        h.update(f.relative_to(base).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()
