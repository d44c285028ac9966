"""Every third-party package the shipped code imports is declared in pyproject.toml (read from the source's
import statements, mapped to distributions by the installed metadata)."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("hiar",)
LOCAL = {"hiar", "benchmarks", "tests", "__future__"}
# imported only behind a guard that reports the feature as unavailable, never required:
OPTIONAL = {"matplotlib": "hiar/eval/plots.py: plot backend, cv2 when absent",
            "pyiqa": "hiar/eval/learned.py: the MUSIQ scorer, listed as skipped when absent"}


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for pkg in SHIPPED:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_third_party_package_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_norm(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0]) for d in meta["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(_imports().items()):
        if module in OPTIONAL:
            continue
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(names))}) imported by {', '.join(sorted(files))}")
    assert not missing, "not in pyproject.toml [project] dependencies: " + "; ".join(missing)
