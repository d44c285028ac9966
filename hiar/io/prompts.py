"""A prompt dataset: where the captions of data generation and evaluation come from (DESIGN.md §4).

Every non-tiny preset reads its prompts from a dataset the user names in ``data.prompts``:

* a ``.txt`` file (one prompt per line), a ``.jsonl`` file (one JSON object per line with a ``prompt`` field) or a
  ``.parquet`` file with a ``prompt`` column;
* or a directory / ``s3://bucket/prefix`` holding such files: every ``.txt``, ``.jsonl`` and ``.parquet`` file under
  it (recursively), read in the order of their names; other files are ignored.

Local paths and ``s3://`` go through :func:`hiar.io.storage.resolve_uri` (pyarrow's S3 filesystem configured from the
environment). Each prompt is stripped of surrounding whitespace, empty prompts are dropped and duplicates are
removed keeping the first occurrence, so the deduplicated list (and its hash) keeps the order of the source.

**The held-out split.** The ``heldout`` distinct prompts whose ``sha256(prompt)`` are smallest are held out for
evaluation, never used for training; the held-out tuple is in that hash order (so the first ``N`` held-out prompts
are the ``N`` smallest hashes whatever ``heldout`` is), the training tuple keeps the source order. Properties of
this rule:

* it depends only on the *set* of distinct prompts and ``heldout``: reordering, splitting or concatenating the
  files, or repeating lines, gives the same split;
* held-out and training prompts of one dataset are disjoint by construction;
* adding prompts never moves a training prompt into the held-out split (new prompts can only lower the hash
  threshold); an existing held-out prompt moves to training only when at least ``heldout`` prompts with smaller
  hashes now exist, i.e. it is *displaced* by new prompts. So a model trained on version A of a dataset and
  evaluated on the held-out split of a larger version B may have seen the displaced ones: compare ``heldout_sha256``
  (recorded in every dataset manifest) before comparing evaluations across dataset versions. Removing a held-out
  prompt promotes the training prompt with the next smallest hash into the split.

The tiny preset keeps its synthetic world's captions (:func:`tiny_prompt_set`) unless ``data.prompts`` is set; a
non-tiny preset without ``data.prompts`` is an error (:func:`prompt_set`), never the synthetic captions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs

SUFFIXES = (".txt", ".jsonl", ".parquet")
MANIFEST_MAX_HELDOUT = 1000  # a manifest lists the held-out prompts up to this many, else only their hash


def _list_sha256(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


@dataclass(frozen=True)
class PromptSet:
    """The deduplicated prompts of ``source`` split into training and held-out prompts (disjoint).

    ``sha256`` hashes the deduplicated list in source order (train and held-out together); ``heldout_sha256`` the
    held-out tuple in its order. Both are sha256 of the JSON list of strings."""

    source: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    sha256: str
    heldout_sha256: str

    def __len__(self) -> int:
        return len(self.train) + len(self.heldout)

    def manifest(self) -> dict:
        """What a dataset manifest or an MLflow run records about the prompts."""
        out = {"source": self.source, "count": len(self), "train_count": len(self.train),
               "heldout_count": len(self.heldout), "sha256": self.sha256, "heldout_sha256": self.heldout_sha256}
        if len(self.heldout) <= MANIFEST_MAX_HELDOUT:
            out["heldout"] = list(self.heldout)
        return out


def split_prompts(source: str, prompts: list[str], heldout: int) -> PromptSet:
    """The :class:`PromptSet` of an already deduplicated list (the held-out rule of the module docstring)."""
    held = sorted(prompts, key=lambda p: (_prompt_hash(p), p))[:heldout]
    held_set = set(held)
    train = tuple(p for p in prompts if p not in held_set)
    return PromptSet(source=source, train=train, heldout=tuple(held), sha256=_list_sha256(prompts),
                     heldout_sha256=_list_sha256(held))


# ---------------------------------------------------------------------------------------------------- reading
def _read_file(fs: pafs.FileSystem, path: str, uri: str, shown: str) -> list[str]:
    """The raw prompts of one file (not stripped); ``shown`` names the file in errors."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"prompts {uri!r}: {shown!r} has an unsupported suffix {suffix or '(none)'!r}; "
                         f"use one of {list(SUFFIXES)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path, filesystem=fs)
        except OSError as err:
            raise ValueError(f"prompts {uri!r}: cannot read {shown!r} as Parquet: {err}") from err
        if "prompt" not in schema.names:
            raise ValueError(f"prompts {uri!r}: {shown!r} has no 'prompt' column (columns: {schema.names})")
        values = pq.read_table(path, filesystem=fs, columns=["prompt"]).column("prompt").to_pylist()
        bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"prompts {uri!r}: {shown!r}: the 'prompt' column must hold strings, got {bad!r}")
        return [v for v in values if v is not None]
    with fs.open_input_stream(path) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts {uri!r}: {shown!r} is not UTF-8 text ({err})") from err
    if suffix == ".txt":
        return text.splitlines()
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompts {uri!r}: {shown!r} line {n} is not JSON ({err})") from err
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"prompts {uri!r}: {shown!r} line {n} has no 'prompt' field (each line must be a JSON "
                             f"object with a 'prompt' column)")
        if not isinstance(record["prompt"], str):
            raise ValueError(f"prompts {uri!r}: {shown!r} line {n}: 'prompt' must be a string, got "
                             f"{record['prompt']!r}")
        out.append(record["prompt"])
    return out


def _read_all(uri: str) -> list[str]:
    """Every raw prompt under ``uri`` (a file, a directory or an S3 prefix), files in name order."""
    from hiar.io.storage import resolve_uri

    s3 = uri.startswith("s3://")
    fs, path = resolve_uri(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return _read_file(fs, path, uri, PurePosixPath(path).name)
        if info.type == pafs.FileType.NotFound:
            if s3:
                raise FileNotFoundError(f"prompts {uri!r}: no objects under this S3 prefix (data.prompts)")
            raise FileNotFoundError(f"prompts {uri!r} does not exist (data.prompts)")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise FileNotFoundError(f"cannot read prompts {uri!r}: {err}") from err
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if not files:
        where = "no objects under this S3 prefix" if s3 else "the directory is empty"
        raise FileNotFoundError(f"prompts {uri!r}: {where} (data.prompts)")
    usable = [f for f in files if PurePosixPath(f).suffix.lower() in SUFFIXES]
    if not usable:
        shown = [f[len(path):].lstrip("/") for f in files[:5]]
        raise ValueError(f"prompts {uri!r}: no {'/'.join(SUFFIXES)} files under it (found {shown}"
                         f"{' ...' if len(files) > 5 else ''})")
    out = []
    for f in usable:
        try:
            out.extend(_read_file(fs, f, uri, f[len(path):].lstrip("/")))
        except OSError as err:
            raise FileNotFoundError(f"cannot read prompts {uri!r} ({f}): {err}") from err
    return out


def load_prompts(uri: str, heldout: int) -> PromptSet:
    """Read, clean, deduplicate and split the prompt dataset at ``uri`` (see the module docstring).

    Raises ``FileNotFoundError`` (missing file, empty directory or S3 prefix, unreadable storage) or ``ValueError``
    (unsupported suffix, a jsonl/parquet without a ``prompt`` column, too few distinct prompts), naming ``uri``."""
    if not uri:
        raise ValueError("no prompt dataset given (data.prompts is empty)")
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 1:
        raise ValueError(f"prompts {uri!r}: data.heldout_prompts must be an integer >= 1, got {heldout!r}")
    raw = _read_all(uri)
    seen: dict[str, None] = {}
    lines = 0
    for p in raw:
        p = p.strip()
        if p:
            lines += 1
            seen.setdefault(p, None)
    prompts = list(seen)
    need = heldout + 1
    if not prompts:
        raise ValueError(f"prompts {uri!r}: no prompts (every line/row is empty); need at least {need} distinct "
                         f"prompts (data.heldout_prompts={heldout} held out + 1 for training)")
    if len(prompts) < need:
        noun = "distinct prompt" if len(prompts) == 1 else "distinct prompts"
        raise ValueError(f"prompts {uri!r}: {lines} non-empty lines/rows but only {len(prompts)} {noun}; need at "
                         f"least {need} (data.heldout_prompts={heldout} held out + 1 for training)")
    return split_prompts(uri, prompts, heldout)


# ---------------------------------------------------------------------------------------------------- from a config
def tiny_prompt_set(cfg=None) -> PromptSet:
    """The tiny world's captions: train = ``hiar.tiny.captions.train_prompts()``, held-out = every held-out caption in the
    order ``hiar.methods.pretrain.eval_prompts`` spreads over (so ``heldout[0]`` is ``eval_prompts(1)[0]``)."""
    from hiar.tiny.captions import heldout_prompts, train_prompts

    train, held = tuple(train_prompts()), tuple(heldout_prompts())
    return PromptSet(source="world:tiny", train=train, heldout=held, sha256=_list_sha256(train + held),
                     heldout_sha256=_list_sha256(held))


_CACHE: dict[tuple[str, int], PromptSet] = {}


def prompt_set(cfg) -> PromptSet:
    """The config's prompts: ``data.prompts`` (split with ``data.heldout_prompts``) when set; the tiny preset without
    it gets :func:`tiny_prompt_set`; any other preset without it is a ``ValueError``. Loaded once per process per
    ``(uri, heldout)`` (a driver asks several times)."""
    uri = cfg.data.prompts
    if not uri:
        if cfg.preset == "tiny":
            return tiny_prompt_set(cfg)
        raise ValueError(f"the {cfg.preset} preset needs a prompt dataset: set data.prompts=<.txt|.jsonl|.parquet "
                         f"file or s3:// prefix> (only the tiny preset has built-in captions)")
    key = (uri, cfg.data.heldout_prompts)
    if key not in _CACHE:
        _CACHE[key] = load_prompts(uri, cfg.data.heldout_prompts)
    return _CACHE[key]


__all__ = ["PromptSet", "load_prompts", "prompt_set", "split_prompts", "tiny_prompt_set", "SUFFIXES"]
