"""The dependency rule of docs/design.md §1, checked on the source: imports point one way."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mst_compile"

# package -> the packages it must not import (directly or through a function-local import)
FORBIDDEN = {
    "ops": ("runtime", "train", "export", "passes", "api", "cli"),
    "runtime": ("train", "export", "passes", "api", "cli"),
    "passes": ("runtime", "train", "export", "api", "cli"),
    "export": ("train", "cli"),
    "integrations": ("train", "cli"),  # integrations use the library, never the trainer
}


def _imports(path: Path) -> set[str]:
    """Top-level mst_compile subpackages/modules a file imports."""
    rel = path.relative_to(PKG).with_suffix("").parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts + [a.name] for a in node.names] if not node.module else [parts]
            elif node.module and node.module.startswith("mst_compile"):
                names = [node.module.split(".")[1:]]
            else:
                continue
            out.update(n[0] for n in names if n)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mst_compile."))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = {str(f.relative_to(PKG)): sorted(_imports(f) & set(FORBIDDEN[package]))
           for f in sorted((PKG / package).rglob("*.py"))}
    assert not {f: b for f, b in bad.items() if b}, f"{package} imports what it must not"


def test_the_cpu_kernel_source_and_crossovers_ship_as_package_data():
    import tomllib

    data = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert (PKG / "ops" / "csrc" / "hsa_cpu.cpp").is_file() and "csrc/*.cpp" in data["mst_compile.ops"]
    assert (PKG / "ops" / "kernel_crossovers.json").is_file() and "kernel_crossovers.json" in data["mst_compile.ops"]
