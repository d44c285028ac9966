"""Every import points down (hiar/__init__.py): read from the source's import statements, function-level imports
included, so a forbidden edge fails here before it surprises anyone at run time."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hiar"
MATHS = ("hiar.core", "hiar.methods", "hiar.eval", "hiar.tiny", "hiar.io")
BASE = ("hiar.config", "hiar.seeding", "hiar.identity")
# rank of each layer: a module may import its own layer and those below (the base modules are used by all, and the
# config knows the schedule's grids, so they share the maths' rank)
RANK = {**{m: 1 for m in BASE + MATHS}, "hiar.platform": 2, "hiar.jobs": 3, "hiar.serving": 3,
        "hiar.pipeline": 4}
# what the maths and the base never import: where the code runs is the platform's business
RUNTIME_PACKAGES = ("ray", "mlflow", "fastapi", "starlette", "uvicorn", "requests")
# what the orchestrator may use of the Serve app: building it, stopping it, its client
SERVING_PUBLIC = ("hiar.serving.app", "hiar.serving.client")


def layer(module: str) -> str | None:
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]):
    """(line, imported module) for every import in the file, relative imports resolved; ``from pkg import mod``
    counts as an import of ``pkg.mod``."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from hiar import x` may name a module
                full = f"{base}.{alias.name}"
                yield node.lineno, full if full in known else base


def edges():
    known = modules()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in imports(path, known):
            yield f"{path.relative_to(ROOT)}:{line}", source, target


def test_every_module_belongs_to_a_layer():
    orphans = [where for where, source, _ in edges() if source != "hiar" and layer(source) is None]
    assert not orphans, f"modules outside every layer (add them to a package or to BASE): {sorted(set(orphans))}"


def test_imports_point_down():
    bad = []
    for where, source, target in edges():
        src, dst = layer(source), layer(target)
        if src is None or dst is None:
            continue
        if RANK[dst] > RANK[src]:
            bad.append(f"{where}: {source} ({src}) imports {target} ({dst}), a layer above it")
        elif {src, dst} == {"hiar.jobs", "hiar.serving"}:
            bad.append(f"{where}: {source} imports {target}: jobs and serving never import each other")
        elif src == "hiar.pipeline" and dst == "hiar.serving" and not target.startswith(SERVING_PUBLIC):
            bad.append(f"{where}: {source} imports serving internals {target} (use {', '.join(SERVING_PUBLIC)})")
        elif src == dst == "hiar.jobs" and source.split(".")[2] != target.split(".")[2] \
                and target != "hiar.jobs.results":
            bad.append(f"{where}: job {source} imports job {target}: share it through the platform or the maths")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_maths_never_imports_the_runtime():
    bad = [f"{where}: {source} imports {target}" for where, source, target in edges()
           if layer(source) in (*BASE, *MATHS) and target.split(".")[0] in RUNTIME_PACKAGES]
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_checker_sees_a_forbidden_edge(tmp_path, monkeypatch):
    """The checker itself: a maths module importing a job, and a job importing serving, are both reported."""
    fake = tmp_path / "hiar"
    (fake / "core").mkdir(parents=True)
    (fake / "jobs").mkdir()
    (fake / "jobs" / "train.py").write_text("")
    (fake / "core" / "x.py").write_text("def f():\n    from hiar.jobs import train\n")
    (fake / "jobs" / "y.py").write_text("from hiar.serving.stages import StepDeployment\nimport ray\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = {(source, target) for _, source, target in edges()}
    assert ("hiar.core.x", "hiar.jobs.train") in found and ("hiar.jobs.y", "hiar.serving.stages") in found
    try:
        test_imports_point_down()
    except AssertionError as err:
        assert "hiar/core/x.py:2" in str(err) and "hiar/jobs/y.py:1" in str(err)
    else:
        raise AssertionError("the forbidden edges were not reported")


def test_a_file_over_400_lines_says_why_at_its_top():
    """Issue 21: no source file over about 400 lines without a reason stated at its top (in its first 12 lines,
    as "... 400 lines because ...")."""
    long_without_reason = []
    for folder in ("hiar", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = path.read_text().splitlines()
            head = " ".join(lines[:12]).lower()
            if len(lines) > 410 and not re.search(r"400 lines\s+because", head):
                long_without_reason.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert not long_without_reason, long_without_reason
