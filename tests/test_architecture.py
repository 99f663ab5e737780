"""Layering: nothing in the package imports an entry point, and no config targets one."""

import ast
from pathlib import Path

import yaml

from vmatdose.config import CONFIG_DIR

PACKAGE = Path(__file__).resolve().parents[1] / "vmatdose"
ENTRY_POINTS = {f"vmatdose.{p.stem}" for p in PACKAGE.glob("*.py")
                if "@hydra.main" in p.read_text() or "argparse" in p.read_text()}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _targets(value) -> list[str]:
    if isinstance(value, dict):
        found = [str(value["_target_"])] if "_target_" in value else []
        return found + [t for v in value.values() for t in _targets(v)]
    if isinstance(value, list):
        return [t for v in value for t in _targets(v)]
    return []


def test_the_entry_points_are_found():
    assert {"vmatdose.train", "vmatdose.evaluate", "vmatdose.predict", "vmatdose.preprocess",
            "vmatdose.compare"} <= ENTRY_POINTS


def test_no_module_imports_an_entry_point():
    offenders = {str(p.relative_to(PACKAGE)): sorted(_imports(p) & ENTRY_POINTS)
                 for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_config_targets_an_entry_point():
    targets = [(str(p.relative_to(CONFIG_DIR)), t) for p in Path(CONFIG_DIR).rglob("*.yaml")
               for t in _targets(yaml.safe_load(p.read_text()) or {})]
    bad = [(f, t) for f, t in targets if any(t.startswith(e + ".") for e in ENTRY_POINTS)]
    assert bad == []
    assert any(t.startswith("vmatdose.data.ingest.sources.") for _, t in targets)
