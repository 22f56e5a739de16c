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
    "scalelab.scaling",
]


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


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


def test_no_platform_init():
    # A platform/__init__.py would turn the source root into a package shadowing the stdlib module.
    assert not (PACKAGE.parent / "__init__.py").exists()
