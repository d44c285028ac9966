"""The one identity function: what a run, a dataset, an evaluation or a cache entry *is*, as a short content hash.

Every identity in the platform (config hashes, dataset and training-stage identities, evaluation identities,
cache keys of URIs) is :func:`identity` of a JSON-able value: sha256 over its canonical JSON (sorted keys, no
whitespace choices left open, non-JSON values by ``str``), cut to 16 hex digits (64 bits: a collision among a
million identities has odds of about 3e-8). Content checksums of files and directories are a different concept
and keep their full sha256 (``hiar.io.storage.tree_sha256``).
"""

from __future__ import annotations

import hashlib
import json

LENGTH = 16


def identity(value) -> str:
    """sha256 (16 hex) of ``value``'s canonical JSON; a string is hashed as its JSON string."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:LENGTH]
