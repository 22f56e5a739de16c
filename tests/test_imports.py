"""Each framework has one home: enforced statically and at import time.

`deepspeed` only in train/; `ray` only in data/ (the pipeline), train/ and sweep/; `mlflow` only in
tracking.py and sweep/. The direction of imports between scalelab's own packages is test_layering.py's.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "scalelab"

# framework -> package paths (relative to scalelab/) allowed to import it
HOMES = {
    "deepspeed": ("train/",),
    "ray": ("data/", "train/", "sweep/"),
    "mlflow": ("tracking.py", "sweep/"),
}
FRAMEWORK_FREE = [
    "scalelab.config", "scalelab.models", "scalelab.losses", "scalelab.gradcache", "scalelab.eval",
    "scalelab.data.shards", "scalelab.data.validate", "scalelab.data.synth", "scalelab.data.batches",
    "scalelab.data.plan", "scalelab.data.tokenizer", "scalelab.data.transforms", "scalelab.scaling",
]
# Driver-side modules that need a file or a plan from `data`, never the Ray Data pipeline.
RAY_DATA_FREE = ["scalelab.train.preflight", "scalelab.train.export"]


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (`from a.b import c` counts as a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported_modules(path)}


def test_frameworks_are_imported_only_in_their_homes():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for framework in _imported_roots(path) & HOMES.keys():
            if not rel.startswith(HOMES[framework]):
                offenders.append(f"{rel} imports {framework}")
    assert not offenders, "frameworks outside their home: " + "; ".join(offenders)


def test_the_scanner_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import ray.data\nfrom mlflow import log_metric\ndef f():\n    import deepspeed\n")
    assert _imported_roots(probe) == {"ray", "mlflow", "deepspeed"}


@pytest.mark.parametrize("module", FRAMEWORK_FREE)
def test_core_modules_load_no_framework(module):
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("module", RAY_DATA_FREE)
def test_driver_side_modules_do_not_load_ray(module):
    # Their scalelab imports sit inside functions too: import every one of them, as a call would.
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    lazy = sorted({name for name in _imported_modules(path) if name.startswith("scalelab.")})
    assert "scalelab.data.tokenizer" in lazy  # the scan sees the function-level imports
    code = f"import sys, {', '.join([module, *lazy])}\nprint('ray' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{module} or its function-level imports pull in ray"


def test_no_platform_init():
    # A platform/__init__.py would turn the source root into a package shadowing the stdlib module.
    assert not (PACKAGE.parent / "__init__.py").exists()
