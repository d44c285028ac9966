"""What names a model directory's content in identities: :func:`checksum_dir` (every byte of its weights and
configs: the teacher a dataset was made with, a bundle's version in the registry) and :func:`fingerprint_dir` (its
configs and fixed blocks of its weights: a frozen real score of tens of GB, named on every plan)."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: A bundle's list of where copies of its shared components live: machine-specific, not what the model is.
LOCATIONS = "locations.json"


def _model_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")
                   and p.name != LOCATIONS)
    if not files:
        raise FileNotFoundError(f"no model files under {str(root)!r}")
    return files


def checksum_dir(directory: str | Path) -> str:
    """sha256 over the weight files of a model directory (which teacher produced a dataset)."""
    h = hashlib.sha256()
    root = Path(directory)
    for p in _model_files(root):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


#: :func:`fingerprint_dir` reads this many evenly spaced blocks of this many bytes from each weight file
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 16


def fingerprint_dir(directory: str | Path) -> str:
    """sha256 over a model directory's config files and, of each weight file, its name, its size and
    ``FINGERPRINT_BLOCKS`` evenly spaced blocks of ``FINGERPRINT_BLOCK_BYTES`` (the whole file up to 4 MiB).

    What names a frozen model in a stage identity (the DMD real score): training changes every tensor, so a
    model retrained at the same path changes its fingerprint, while a 14B real score (tens of GB, where
    :func:`checksum_dir` would read all of it on every plan) costs about 4 MiB read per file. Blocks are taken at
    fixed offsets, so two copies of a model give one fingerprint wherever they are."""
    h = hashlib.sha256()
    root = Path(directory)
    span = FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES
    for p in _model_files(root):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with p.open("rb") as f:
            if p.suffix == ".json" or size <= span:
                h.update(f.read())
                continue
            stride = (size - FINGERPRINT_BLOCK_BYTES) // (FINGERPRINT_BLOCKS - 1)
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(k * stride)
                h.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return h.hexdigest()[:16]
