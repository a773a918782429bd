"""Imports between kubetrain's layers go one way: from higher layers to lower ones.

Layers, low to high:

    core < config < data < training < assessment < report < serving
         < stages (kubetrain/stages.py, kubetrain/registry.py)
         < components < pipelines < cluster < local < cli

A module under kubetrain/ may import modules of its own layer or of lower
layers only. Every import counts: module level, inside functions, under
``if TYPE_CHECKING:``. ``kubetrain/__init__.py`` (the package root,
``__version__``) sits below every layer.

``components/`` and ``pipelines/`` (installed as ``kubetrain.components`` and
``kubetrain.pipelines``) are the KFP wiring outside kubetrain/: their own
imports are not checked here, but as import targets they rank between stages
and cluster (the components wrap the stage functions; cluster compiles and
local runs the pipeline).

Pure `ast`, nothing is imported: a unit test that runs in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kubetrain"
#: installed module prefix -> source folder (see [tool.setuptools.package-dir])
SOURCES = {
    "kubetrain": ROOT / "kubetrain",
    "kubetrain.components": ROOT / "components",
    "kubetrain.pipelines": ROOT / "pipelines",
}
#: low to high; each entry: layer name and the module prefixes that belong to it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("kubetrain.core",)),
    ("config", ("kubetrain.config",)),
    ("data", ("kubetrain.data",)),
    ("training", ("kubetrain.training",)),
    ("assessment", ("kubetrain.assessment",)),
    ("report", ("kubetrain.report",)),
    ("serving", ("kubetrain.serving",)),
    ("stages", ("kubetrain.stages", "kubetrain.registry")),
    ("components", ("kubetrain.components",)),
    ("pipelines", ("kubetrain.pipelines",)),
    ("cluster", ("kubetrain.cluster",)),
    ("local", ("kubetrain.local",)),
    ("cli", ("kubetrain.cli",)),
]
ROOT_RANK = -1  # `kubetrain` itself (__init__.py): importable from anywhere


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer name) of a kubetrain module; None for one no layer claims."""
    if module == PACKAGE:
        return ROOT_RANK, "kubetrain (package root)"
    for rank, (name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank, name
    return None


def modules() -> dict[str, Path]:
    """Every source module by its installed dotted name (kubetrain/, components/, pipelines/)."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def is_package(module: str, known: dict[str, Path]) -> bool:
    return module in known and known[module].name == "__init__.py"


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, kubetrain module) for every import in the file, relative ones resolved;
    `from pkg import name` counts as importing pkg.name when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package(module, known) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((node.lineno, sub if sub in known else source))
    return sorted(
        (line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")
    )


def violations() -> tuple[list[str], list[str]]:
    """(upward imports, modules without a layer), each as readable lines."""
    known = modules()
    upward, unlayered = [], []
    for module, path in sorted(known.items()):
        if not path.is_relative_to(SOURCES[PACKAGE]):
            continue  # components/, pipelines/: targets only (see the module docstring)
        own = layer_of(module)
        if own is None:
            unlayered.append(f"{path.relative_to(ROOT)}: module {module} belongs to no layer")
            continue
        for line, target in imported_modules(module, path, known):
            theirs = layer_of(target)
            if theirs is None:
                unlayered.append(
                    f"{path.relative_to(ROOT)}:{line}: imports {target}, which belongs to no layer"
                )
            elif theirs[0] > own[0]:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {module} ({own[1]}) imports "
                    f"{target} ({theirs[1]}), a higher layer"
                )
    return upward, unlayered


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """Guards the checker itself: relative, in-function and `from pkg import module`."""
    pkg = tmp_path / "kubetrain"
    (pkg / "core").mkdir(parents=True)
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text(
        "from . import b\n"
        "def f():\n    from kubetrain import stages\n    import kubetrain.cli.main\n"
        "from ..config.settings import X\n"
    )
    (pkg / "core" / "b.py").write_text("")
    known = {
        "kubetrain.core": pkg / "core" / "__init__.py",
        "kubetrain.core.a": pkg / "core" / "a.py",
        "kubetrain.core.b": pkg / "core" / "b.py",
        "kubetrain.stages": pkg / "stages.py",
    }
    assert imported_modules("kubetrain.core.a", pkg / "core" / "a.py", known) == [
        (1, "kubetrain.core.b"),
        (3, "kubetrain.stages"),
        (4, "kubetrain.cli.main"),
        (5, "kubetrain.config.settings"),
    ]
    assert layer_of("kubetrain.registry") == layer_of("kubetrain.stages")
    assert layer_of("kubetrain")[0] < layer_of("kubetrain.core.errors")[0]
    assert layer_of("kubetrain.somewhere_new") is None


def test_every_module_is_in_a_layer():
    known = modules()
    assert "kubetrain.stages" in known and "kubetrain.cli.main" in known
    _, unlayered = violations()
    if unlayered:
        pytest.fail(
            "add these to LAYERS in tests/test_layers.py:\n  " + "\n  ".join(unlayered),
            pytrace=False,
        )


def test_imports_only_go_down_the_layers():
    upward, _ = violations()
    if upward:
        order = " < ".join(name for name, _ in LAYERS)
        pytest.fail(
            f"{len(upward)} import(s) go up the layers ({order}):\n  " + "\n  ".join(upward),
            pytrace=False,
        )
