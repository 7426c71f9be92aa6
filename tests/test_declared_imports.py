"""Every module the repository imports comes from a distribution that pyproject.toml declares (issue 23).

A package installed by hand on one machine makes the tests pass there and fail on a fresh one, where
`.ci/run` installs the project from pyproject.toml alone. This reads every Python file of the
repository (runtime/, export/, benchmarks/, tests/, tools/), every import in it at any depth (lazy
ones inside functions too), the modules named by literal `importlib.import_module`, `__import__`,
`pytest.importorskip` and `importlib.util.find_spec` calls, and the imports of the Python programs that
files hold as strings (the `python -c` scripts of tests). Each top-level module is then mapped to the
distributions that provide it in this environment (`importlib.metadata.packages_distributions()`):
- one imported anywhere must be provided by a distribution that pyproject.toml declares (a dependency
  or any extra);
- one imported by tests/ must be provided by a dependency or by an extra that `.ci/run` installs,
  else CI's fresh environment lacks it;
- one that is not installed here at all fails too, unless EXCEPTIONS names it with the reason.
Modules of the standard library and of the repository itself are skipped.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Modules that need not be installed where the tests run, each with the reason. Checked both ways: a
# name here that nothing imports any more fails too (test_every_exception_is_still_imported).
EXCEPTIONS = {
    # benchmark peers: each runs in its own venv (benchmarks/peers/__init__.py), never the project's
    "optimum": "the optimum-intel peer's own venv .venv-optimum (benchmarks/peers/setup-optimum.sh); "
               "the `optimum` extra documents it, and must never be installed into the project env",
    "openvino_genai": "the openvino.genai peer (benchmarks/peers/genai_worker.py), in the optimum peer's venv "
                      "(benchmarks/peers/setup-optimum.sh); the `optimum` extra documents it",
    "openvino_tokenizers": "the openvino.genai peer's tokenizer IR (benchmarks/peers/optimum_fewstep.py), in the "
                           "optimum peer's venv; the `optimum` extra documents it",
    "stable_diffusion_cpp": "the stable-diffusion.cpp peer's own venv .venv-sdcpp "
                            "(benchmarks/peers/setup-sdcpp.sh); probed for absence by tests/test_benchmark_peers.py",
    # NVIDIA GPU extras (tensorrt-cu12/-cu13, ort-tensorrt-cu12/-cu13): CUDA wheels, never on a CPU machine
    "tensorrt": "the tensorrt-cu12 / tensorrt-cu13 extras (NVIDIA GPU machines only; docs/tensorrt.md)",
    "cuda": "cuda-python of the tensorrt-cu12 / tensorrt-cu13 extras (NVIDIA GPU machines only)",
    "tensorrt_libs": "tensorrt-cu12-libs / tensorrt-cu13-libs of the ort-tensorrt extras (NVIDIA GPU machines only)",
}

# calls whose first argument, a string literal, names a module to import or look for
_IMPORTING_CALLS = {"import_module", "__import__", "importorskip", "find_spec"}
# folders that are not the repository's code: VCS, caches, build outputs, virtual environments
_SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules"}


def _norm(name: str) -> str:
    """A distribution name in PEP 503's normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str], project: str) -> set[str]:
    """The distribution names of PEP 508 requirement strings, less the project's own (self-references
    such as `sd-runtime[gpu-cu12]` pull in another extra, which is read on its own)."""
    names = set()
    for req in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        assert match, f"pyproject.toml: cannot read the requirement {req!r}"
        names.add(_norm(match.group(1)))
    return names - {_norm(project)}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ci_extras() -> list[str]:
    """The extras `.ci/run` installs (its `pip install -e ".[a,b,...]"`)."""
    match = re.search(r"""-e\s+["']?\.\[([^\]]+)\]""", (ROOT / ".ci" / "run").read_text())
    assert match, ".ci/run: no `pip install -e \".[extras]\"` found"
    return [e.strip() for e in match.group(1).split(",")]


def declared(extras: list[str] | None = None) -> set[str]:
    """Normalized names of the distributions pyproject.toml declares: its dependencies and the extras
    named (every extra when None)."""
    project = _pyproject()["project"]
    groups = project.get("optional-dependencies", {})
    reqs = list(project.get("dependencies", []))
    for extra in groups if extras is None else extras:
        assert extra in groups, f"pyproject.toml has no extra {extra!r}"
        reqs += groups[extra]
    return _requirement_names(reqs, project["name"])


def python_files(root: Path = ROOT) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if not any(p.startswith(".") or p in _SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            yield path


def _literal_imports(node: ast.Call) -> Iterator[str]:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in _IMPORTING_CALLS and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
            yield first.value


def _embedded_program(text: str) -> ast.AST | None:
    """The syntax tree of a string that is itself a Python program with imports (a `python -c` script),
    else None."""
    if "import " not in text or "\n" not in text:
        return None
    try:
        return ast.parse(textwrap.dedent(text))
    except SyntaxError:
        return None


def imported_modules(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(top-level module, line) of every absolute import in `tree`, at any depth."""
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):
            names = list(_literal_imports(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            program = _embedded_program(node.value)
            names = [name for name, _ in imported_modules(program)] if program else []
        for name in names:
            yield name.split(".")[0], node.lineno


def _local(module: str, path: Path, root: Path) -> bool:
    """The repository's own packages and modules, and the sibling modules of a file outside any package
    (tests' helpers: pytest puts tests/ on sys.path). Inside a package an import is absolute: its
    engines/tensorrt.py does not make `import tensorrt` local."""
    folders = [root] + ([] if (path.parent / "__init__.py").is_file() else [path.parent])
    return any((f / f"{module}.py").is_file() or (f / module / "__init__.py").is_file() for f in folders)


def third_party_imports(root: Path = ROOT) -> dict[str, list[str]]:
    """Top-level third-party module -> the places ("path:line") that import it."""
    found: dict[str, list[str]] = {}
    for path in python_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for module, line in imported_modules(tree):
            if module in sys.stdlib_module_names or _local(module, path, root):
                continue
            found.setdefault(module, []).append(f"{path.relative_to(root)}:{line}")
    return found


def _where(places: list[str]) -> str:
    return ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")


def problems(imports: dict[str, list[str]], providers: dict[str, list[str]], anywhere: set[str],
             for_tests: set[str]) -> list[str]:
    """What is wrong with `imports` (module -> places), given the distributions that provide each
    module here and the declared distributions: anywhere, and in what CI installs for the tests."""
    out = []
    for module, places in sorted(imports.items()):
        if module in EXCEPTIONS:
            continue
        dists = sorted({_norm(d) for d in providers.get(module, [])})
        if not dists:
            out.append(f"{module}: not installed here and not in EXCEPTIONS (imported at {_where(places)})")
        elif not set(dists) & anywhere:
            out.append(f"{module}: provided by {', '.join(dists)}, which pyproject.toml does not declare "
                       f"(imported at {_where(places)})")
        elif not set(dists) & for_tests and any(p.startswith("tests/") for p in places):
            out.append(f"{module}: provided by {', '.join(dists)}, which no extra that .ci/run installs "
                       f"declares, but the tests import it (at {_where(places)})")
    return out


def test_every_imported_module_comes_from_a_declared_distribution():
    found = problems(third_party_imports(), importlib.metadata.packages_distributions(), declared(),
                     declared(_ci_extras()))
    assert not found, "modules the code imports that a fresh environment would lack:\n" + "\n".join(found)


def test_every_exception_is_still_imported():
    stale = set(EXCEPTIONS) - set(third_party_imports())
    assert not stale, f"EXCEPTIONS names modules that nothing in the repository imports: {sorted(stale)}"


def test_the_scan_sees_lazy_literal_and_embedded_imports(tmp_path):
    """The reader itself: a nested import, an import_module literal, a `python -c` program in a string,
    a sibling helper module and the standard library, and what each outcome of problems() says."""
    for folder in ("scripts", "pkg"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "helper.py").write_text("")
        # one line a string: the lines are not themselves an embedded program of this file
        (tmp_path / folder / "mod.py").write_text("\n".join([
            "import os", "import helper", "def f():", "    import lazy_one.sub",
            "    importlib.import_module('literal_one')", 'SCRIPT = """', "import json",
            "from embedded_one import thing", '"""']))
    (tmp_path / "pkg" / "__init__.py").write_text("")
    imports = third_party_imports(tmp_path)
    assert set(imports) == {"lazy_one", "literal_one", "embedded_one", "helper"}, imports
    assert imports["helper"] == ["pkg/mod.py:2"]  # scripts/mod.py's helper is its sibling; pkg's is absolute
    del imports["helper"]
    providers = {"lazy_one": ["Lazy_One"], "literal_one": ["undeclared-dist"], "embedded_one": ["ci-only"]}
    imports["embedded_one"] = ["tests/test_x.py:3"]
    found = problems({**imports, "missing_one": ["tools/x.py:1"]}, providers, {"lazy-one", "ci-only"}, {"lazy-one"})
    assert [line.split(":")[0] for line in found] == ["embedded_one", "literal_one", "missing_one"], found
    assert "no extra that .ci/run installs" in found[0] and "does not declare" in found[1]
    assert "not installed here" in found[2]
