"""Layering: imports only point down the layers that ``docs/architecture.md`` declares,
nothing in the package imports an entry point, and no config targets one."""

import ast
import re
from pathlib import Path

import yaml

from vmatdose.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vmatdose"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
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


# --- layers ---------------------------------------------------------------------------

def declared_layers(text: str) -> dict[str, int]:
    """Unit (``data``, ``workflow``, ``__init__``...) -> layer (0 = bottom) from the table
    of the ``## Layers`` section: one row per layer, top first; second column lists the
    sub-packages (``records/``) and modules (``plot_style.py``) relative to ``vmatdose/``."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    layers: dict[str, int] = {}
    for depth, row in enumerate(reversed(rows)):
        for name in re.findall(r"`([^`]+)`", row.split("|")[2]):
            unit = name.removesuffix("/").removesuffix(".py")
            assert unit not in layers, f"{name} is declared in two layers"
            layers[unit] = depth
    return layers


def unit_of(module: str) -> str | None:
    """The layer unit of a dotted module name: its first part below ``vmatdose``."""
    parts = module.split(".")
    if parts[0] != "vmatdose":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at any depth (function-level
    imports too); ``from a import b`` yields ``a.b`` (``b`` may be a module), relative
    imports are made absolute."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def layer_violations(layers: dict[str, int], root: Path = ROOT) -> list[str]:
    """``file:line: a (layer i) imports b (layer j)`` for every import of a module under
    ``root/vmatdose`` that points neither to a lower layer nor into the importer's own
    unit; a module of an undeclared unit is named too."""
    bad = []
    for path in sorted((root / "vmatdose").rglob("*.py")):
        where, source = path.relative_to(root), unit_of(module_name(path, root))
        if source not in layers:
            bad.append(f"{where}: '{source}' is in no layer of {ARCHITECTURE.name}")
            continue
        for line, target in imported_modules(path, root):
            unit = unit_of(target)
            if unit is None or unit == source:
                continue
            if unit not in layers or layers[unit] >= layers[source]:
                bad.append(f"{where}:{line}: {source} (layer {layers[source]}) imports "
                           f"{target} (layer {layers.get(unit)})")
    return bad


LAYERS = declared_layers(ARCHITECTURE.read_text())


def test_the_layer_table_names_the_package_bottom_up():
    assert LAYERS["errors"] == 0 and LAYERS["records"] == LAYERS["plot_style"] == 1
    assert LAYERS["config_schema"] < LAYERS["config"] < LAYERS["protocol"]
    assert LAYERS["data"] < LAYERS["inference"] < LAYERS["training"] < LAYERS["workflow"]
    assert LAYERS["training"] == LAYERS["evaluation"] < LAYERS["tracking"]
    assert LAYERS["workflow"] < LAYERS["train"] == LAYERS["evaluate"] == LAYERS["predict"]
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert set(LAYERS) == units  # every module in a row, no row for what does not exist


def test_imports_only_point_down():
    assert layer_violations(LAYERS) == []


def test_upward_sideways_and_undeclared_imports_are_named(tmp_path):
    files = {
        "records/bad.py": "import json\nfrom .run_record import git_state\n"
                          "def f():\n    from vmatdose.training import fit\n",
        "records/up.py": "from ..evaluation import report\nfrom vmatdose import workflow\n",
        "training/side.py": "from vmatdose.evaluation.pipeline import evaluate_checkpoint\n"
                            "from vmatdose.plot_style import plt\nimport vmatdose.data.case\n",
        "newthing/x.py": "",
    }
    for name, code in files.items():
        (tmp_path / "vmatdose" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "vmatdose" / name).write_text(code)
    t, w, e = LAYERS["training"], LAYERS["workflow"], LAYERS["evaluation"]
    assert layer_violations(LAYERS, tmp_path) == [
        "vmatdose/newthing/x.py: 'newthing' is in no layer of architecture.md",
        f"vmatdose/records/bad.py:4: records (layer 1) imports vmatdose.training.fit (layer {t})",
        f"vmatdose/records/up.py:1: records (layer 1) imports vmatdose.evaluation.report "
        f"(layer {e})",
        f"vmatdose/records/up.py:2: records (layer 1) imports vmatdose.workflow (layer {w})",
        f"vmatdose/training/side.py:1: training (layer {t}) imports "
        f"vmatdose.evaluation.pipeline.evaluate_checkpoint (layer {e})",
    ]


# --- library output -------------------------------------------------------------------

#: Modules that are the entry points' error exit (``error: ...`` and Hydra's hints on
#: stderr, then the exit status), the one print a library module may hold.
ERROR_EXITS = {"vmatdose.errors", "vmatdose.cli_hints", "vmatdose.records.job_failure"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _calls(path: Path, name: str) -> list[int]:
    """Lines of ``path`` that call ``name`` (``print``, ``matplotlib.use``)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name]


def test_library_modules_log_instead_of_printing():
    library = [p for p in PACKAGE.rglob("*.py")
               if _module_name(p) not in ENTRY_POINTS | ERROR_EXITS]
    prints = {str(p.relative_to(PACKAGE)): _calls(p, "print") for p in library}
    assert {k: v for k, v in prints.items() if v} == {}


def _import_time_calls(path: Path, name: str) -> list[int]:
    """Lines of ``path`` that call ``name`` when the module is imported (outside any
    function or method body)."""
    tree = ast.parse(path.read_text())
    in_functions = {id(node) for fn in ast.walk(tree)
                    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(fn)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and id(node) not in in_functions
            and ast.unparse(node.func) == name]


def test_no_module_switches_the_matplotlib_backend_when_imported():
    """Importing the library leaves a notebook's backend alone; the entry points call
    ``plot_style.use_file_backend``."""
    switches = {str(p.relative_to(PACKAGE)): _import_time_calls(p, "matplotlib.use")
                for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in switches.items() if v} == {}
    assert _calls(PACKAGE / "plot_style.py", "matplotlib.use")  # the one switch, on call
