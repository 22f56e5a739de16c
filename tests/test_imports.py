"""Each framework has one home: enforced statically and at import time.

`deepspeed` only in train/; `ray` only in data/ (the pipeline), train/ and sweep/; `mlflow` only
in tracking.py and sweep/; `rich` only in console.py. The direction of imports between scalelab's own
packages is test_layering.py's.
"""

import ast
import json
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
    "rich": ("console.py",),
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


# One interpreter imports the heavy dependencies every module may use (none of them loads a framework:
# checked), then forks a child per case that imports the case's modules and reports which frameworks
# they loaded. A fresh interpreter per case would pay torch's import each time.
_PROBE = """
import importlib, json, os, sys
import numpy, PIL.Image, pydantic, tokenizers, torch, timm  # the shared dependencies
FRAMEWORKS = ("ray", "deepspeed", "mlflow")
assert not [f for f in FRAMEWORKS if f in sys.modules], "a shared dependency loads a framework"
out = {}
for case, modules in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            for module in modules:
                importlib.import_module(module)
            found = [f for f in FRAMEWORKS if f in sys.modules]
        except BaseException as err:
            found = f"import failed: {err!r}"
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        out[case] = json.loads(pipe.read())
    os.waitpid(pid, 0)
print(json.dumps(out))
"""


def _lazy_imports(module: str) -> list[str]:
    """The scalelab modules `module` imports anywhere, function bodies included."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    return sorted({name for name in _imported_modules(path) if name.startswith("scalelab.")})


@pytest.fixture(scope="module")
def loaded_frameworks() -> dict[str, list[str]]:
    """case → the frameworks its imports loaded: each FRAMEWORK_FREE module alone, and each RAY_DATA_FREE
    module with every scalelab module it imports inside functions (as a call would)."""
    cases = {m: [m] for m in FRAMEWORK_FREE} | {f"{m}+lazy": [m, *_lazy_imports(m)] for m in RAY_DATA_FREE}
    cases["probe check"] = ["scalelab.train.loop"]  # loads ray: the probe must say so
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", FRAMEWORK_FREE)
def test_core_modules_load_no_framework(module, loaded_frameworks):
    assert loaded_frameworks[module] == [], f"{module} pulled in: {loaded_frameworks[module]}"


@pytest.mark.parametrize("module", RAY_DATA_FREE)
def test_driver_side_modules_do_not_load_ray(module, loaded_frameworks):
    assert "scalelab.data.tokenizer" in _lazy_imports(module)  # the scan sees the function-level imports
    found = loaded_frameworks[f"{module}+lazy"]
    assert isinstance(found, list) and "ray" not in found, f"{module} or its function-level imports: {found}"


def test_the_probe_sees_a_framework_import(loaded_frameworks):
    """The forked-child probe reports a framework a module loads (here ray, through train/loop.py)."""
    assert "ray" in loaded_frameworks["probe check"]


def test_no_platform_init():
    # A platform/__init__.py would turn the source root into a package shadowing the stdlib module.
    assert not (PACKAGE.parent / "__init__.py").exists()
