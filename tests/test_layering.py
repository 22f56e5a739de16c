"""The dependency direction of the package is enforced by an import scan.

Every `import scalelab.…` / `from scalelab… import …` anywhere in a module (function-level and
`TYPE_CHECKING` imports included) may name only its own unit or a unit in a lower layer of LAYERS. The
frameworks' homes are checked separately in test_imports.py.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "scalelab"

# Bottom to top. A unit is a top-level package or module of scalelab. A unit may import its own unit
# and any unit in a lower row; never a unit in its own row (siblings stay independent) or a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__",),                     # the package root: __version__ only
    ("config", "scaling", "console", "storage"),  # leaves: configs; fits, plots; the terminal; storage I/O
    ("models", "data", "losses"),      # single-device modules; shards and pipeline; pure loss functions
    ("eval", "gradcache", "tracking"),
    ("train",),
    ("sweep",),
    ("verify",),                       # cli-level tool: the self-check behind `scalelab check`
    ("cli",),                          # the `scalelab` entry point
)
LAYER_OF = {unit: rank for rank, row in enumerate(LAYERS) for unit in row}

# (importing module, imported module) -> why it is tolerated for now. Each entry is debt: fix the import,
# then delete the entry (test_allow_list_is_not_stale fails once an entry no longer matches anything).
# Empty: the scan found no violation.
ALLOWED: dict[tuple[str, str], str] = {}


def _unit(module: str) -> str:
    """scalelab.train.loop -> 'train'; the bare package root -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def scalelab_imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package in `path`, relative imports resolved.

    `from scalelab import eval` imports the subpackage, so a name that is a module counts as one.
    """
    here = _module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if _is_module(child, root) else base))
    return sorted({(line, name) for line, name in found if name.split(".")[0] == root.name})


def layering_violations(root: Path = PACKAGE, allowed: dict = ALLOWED) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        unit = _unit(module)
        if unit not in LAYER_OF:
            problems.append(f"{path.relative_to(root.parent)}: unit {unit!r} is not in LAYERS — place it")
            continue
        for line, imported in scalelab_imports(path, root):
            target = _unit(imported)
            if target == unit or (module, imported) in allowed:
                continue
            if target not in LAYER_OF or LAYER_OF[target] >= LAYER_OF[unit]:
                where = ("in the same layer as" if LAYER_OF.get(target) == LAYER_OF[unit]
                         else "above" if target in LAYER_OF else "not in LAYERS, so not below")
                problems.append(f"{path.relative_to(root.parent)}:{line}: {module} imports {imported} "
                                f"({target!r} is {where} {unit!r})")
    return problems


def test_every_module_imports_only_lower_layers():
    problems = layering_violations()
    assert not problems, "layering violations (see LAYERS in tests/test_layering.py):\n" + "\n".join(problems)


def test_allow_list_is_not_stale():
    imports = {(_module_name(path, PACKAGE), name)
               for path in PACKAGE.rglob("*.py") for _, name in scalelab_imports(path)}
    stale = sorted(set(ALLOWED) - imports)
    assert not stale, f"allow-list entries that no longer occur (delete them): {stale}"


def test_every_unit_is_placed_once():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py") or (p / "__init__.py").is_file()}
    placed = [unit for row in LAYERS for unit in row]
    assert len(placed) == len(set(placed))
    assert units == set(placed)


def test_the_scan_catches_upward_and_sibling_imports(tmp_path):
    root = tmp_path / "scalelab"
    for rel in ("__init__.py", "config.py", "data/__init__.py", "models/__init__.py", "eval/__init__.py",
                "train/__init__.py", "train/loop.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / "data" / "pipeline.py").write_text(
        "from scalelab import __version__\n"          # root: below everything, fine
        "from scalelab.config import X\n"            # lower layer, fine
        "from . import helpers\n"                    # own package, fine
        "def f():\n"
        "    from ..eval import zeroshot\n"          # line 5: relative, function-level, upward
        "    import scalelab.models\n"               # line 6: sibling
        "    from scalelab import train\n"           # line 7: upward, subpackage named in `from … import`
    )
    problems = layering_violations(root, allowed={})
    assert [p.split(": ")[0] for p in problems] == [
        "scalelab/data/pipeline.py:5", "scalelab/data/pipeline.py:6", "scalelab/data/pipeline.py:7"]
    assert problems[0].endswith("scalelab.data.pipeline imports scalelab.eval ('eval' is above 'data')")
    assert problems[1].endswith("imports scalelab.models ('models' is in the same layer as 'data')")
    assert problems[2].endswith("imports scalelab.train ('train' is above 'data')")
    allowed = {("scalelab.data.pipeline", "scalelab.models"): "test"}
    assert len(layering_violations(root, allowed=allowed)) == 2
