"""The environment is one that ``pyproject.toml`` allows: installed versions inside its ranges, and every module spa
imports from its dependencies there (read from spa's own source, so the list follows the code). No network.

``python tests/test_versions.py --lower-bounds`` prints each dependency pinned to its lower bound, one per line: the
pip constraints ``make test-min`` installs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import site
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
EXTRAS = ("dev",)


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli (a pytest dependency there), else pip's copy of it
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads(PYPROJECT.read_text())["project"]


def declared() -> list[str]:
    """pyproject's requirement strings: the dependencies, then the ``EXTRAS``."""
    project = _project()
    return [*project["dependencies"], *(r for e in EXTRAS for r in project["optional-dependencies"][e])]


def lower_bounds() -> list[str]:
    """``name==X`` for each requirement with ``>=X`` (``make test-min``'s constraints)."""
    pins = []
    for req in declared():
        name, spec = re.match(r"\s*([A-Za-z0-9._-]+)(?:\[[^]]*\])?\s*([^;]*)", req).groups()
        lower = re.search(r">=\s*([^,\s]+)", spec)
        if lower is None:
            raise ValueError(f"pyproject.toml: {req!r} has no lower bound (>=) for make test-min to test")
        pins.append(f"{name}=={lower.group(1)}")
    return pins


if __name__ == "__main__":
    if sys.argv[1:] != ["--lower-bounds"]:
        sys.exit(f"usage: {sys.argv[0]} --lower-bounds")
    print("\n".join(lower_bounds()))
    sys.exit(0)


import pytest  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402

import spa  # noqa: E402


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in declared()]


def test_python_version_is_allowed() -> None:
    allowed = SpecifierSet(_project()["requires-python"])
    assert allowed.contains(".".join(map(str, sys.version_info[:3]))), (
        f"Python {sys.version} outside {allowed}"
    )


def test_installed_versions_are_inside_pyproject_ranges() -> None:
    wrong = []
    for req in _requirements():
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{req.name}: not installed (needs {req.specifier})")
            continue
        if not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name} {version}: outside {req.specifier}")
    assert not wrong, "installed versions pyproject.toml does not allow:\n" + "\n".join(wrong)


def test_installed_spa_metadata_is_pyproject_s() -> None:
    """The spa-vit installed in this environment was installed from this pyproject (not a stale install after a
    range changed). Read from site-packages: the source tree's own ``spa_vit.egg-info`` (on ``sys.path`` when run
    from the repository root) is whatever venv installed last."""
    dists = list(metadata.distributions(name="spa-vit", path=site.getsitepackages()))
    if not dists:
        pytest.skip("spa-vit is not installed in this environment (imported from the source tree)")
    installed = {
        (r.name, str(r.specifier))
        for r in map(Requirement, dists[0].requires or [])
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in EXTRAS)
    }
    assert installed == {(r.name, str(r.specifier)) for r in _requirements()}, (
        "the installed spa-vit's requirements differ from pyproject.toml's: reinstall (make setup)"
    )


def _spa_modules() -> list[str]:
    return sorted(
        ["spa", *(m.name for m in pkgutil.walk_packages(spa.__path__, "spa."))],
    )


@pytest.mark.parametrize("module", _spa_modules())
def test_spa_module_imports(module: str) -> None:
    importlib.import_module(module)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(
        isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError", "Exception"} for n in names
    )


def _third_party_imports() -> dict[tuple[str, str | None], str]:
    """Every ``import m`` / ``from m import n`` of a non-stdlib, non-spa module anywhere in spa's source (also
    inside functions), except those under a ``try`` that catches ``ImportError`` (optional): ``(m, n) -> file``."""
    found: dict[tuple[str, str | None], str] = {}

    def visit(node: ast.AST, where: str, optional: bool) -> None:
        if isinstance(node, ast.Try):
            guarded = optional or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, where, guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, where, optional)
            return
        if not optional and isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault((alias.name, None), where)
        elif not optional and isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                found.setdefault((node.module, alias.name), where)
        for child in ast.iter_child_nodes(node):
            visit(child, where, optional)

    package = Path(spa.__file__).parent
    for path in sorted(package.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), str(path.relative_to(package.parent)), False)
    return {
        k: v
        for k, v in found.items()
        if k[0].split(".")[0] not in {*sys.stdlib_module_names, "spa", "__future__"}
    }


def test_every_name_spa_imports_from_its_dependencies_exists() -> None:
    """Including the imports inside functions (e.g. timm internals, FlexAttention on the CUDA path), which the
    module imports above do not run."""
    missing = []
    for (module, name), where in sorted(_third_party_imports().items(), key=str):
        try:
            mod = importlib.import_module(module)
            if name is not None and name != "*" and not hasattr(mod, name):
                importlib.import_module(f"{module}.{name}")  # a submodule not imported by its package
        except ImportError as e:
            missing.append(
                f"{where}: {'from ' + module + ' import ' + name if name else 'import ' + module}: {e}"
            )
    assert not missing, "imports spa needs that this environment lacks:\n" + "\n".join(missing)
