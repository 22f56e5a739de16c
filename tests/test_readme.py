"""README's Python API example runs as written: the code block is extracted and executed unchanged."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    """The first ```python block after the `## Python API` heading (and before the next `## ` one)."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert blocks, "README's Python API section has no ```python block"
    return blocks[0]


def test_python_api_example_runs_as_written():
    code = python_api_example()
    assert code.startswith("import torch\n") and "create_model(" in code  # the block the README shows
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:Python API", "exec"), namespace)  # the README block, unchanged

    model, result = namespace["model"], namespace["result"]
    assert torch.isfinite(namespace["loss"]) and torch.isfinite(torch.as_tensor(result.loss))
    # The example's claims: every parameter got a gradient from the cached step, the optimizer stepped,
    # and clamp_() kept the temperature at or below ln 100.
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert namespace["optimizer"].state, "optimizer.step() did not run"
    assert model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_layout_lists_every_package_and_top_level_module():
    layout = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    # Entries are indented by 2 or 4; a description continued on the next line is indented further.
    listed = {line.split()[0] for line in layout.splitlines()
              if line.startswith("  ") and line.strip() and len(line) - len(line.lstrip()) <= 4}
    package = README.parent / "platform" / "scalelab"
    expected = {p.name for p in package.glob("*.py")}
    expected |= {init.parent.name + "/" for init in package.rglob("__init__.py") if init.parent != package}
    assert expected == listed, f"README Layout lists {sorted(listed)}, the package has {sorted(expected)}"
