"""The `scalelab` command: once as a user runs it (a subprocess through the console script), the rest
through `cli.main` in this process (the same code after the entry point, without an interpreter start
per test)."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from scalelab.cli import main

SCALELAB = shutil.which("scalelab", path=str(Path(sys.executable).parent)) or "scalelab"


def _console_script(*args):
    return subprocess.run([SCALELAB, *args], capture_output=True, text=True, timeout=600)


def _run(*args):
    """`scalelab *args` in this process: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_models_lists_every_preset_with_counts():
    out = _run("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert {"micro", "tiny", "small", "vit-b16", "basic-s", "basic-m", "basic-l"} <= set(rows)
    assert rows["basic-l"]["params"] > rows["basic-m"]["params"] > rows["basic-s"]["params"]
    assert all(r["macs_per_sample"] > 0 for r in rows.values())
    table = _run("models")
    assert table.returncode == 0 and "basic-l" in table.stdout and "GMACs/sample" in table.stdout


def test_config_resolves_the_preset(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  preset: micro\ntrain:\n  global_batch: 64\n")
    out = _run("config", str(path), "--set", "model.overrides.text.dropout=0.1")
    assert out.returncode == 0, out.stderr
    assert "resolved_model:" in out.stdout and "dropout: 0.1" in out.stdout


def test_bad_preset_is_a_clear_config_error():
    out = _console_script("config", "--set", "model.preset=gigantic")
    assert out.returncode == 2
    assert "model.preset" in out.stderr and "gigantic" in out.stderr and "micro" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_command_ends_with_mains_code_after_the_exit_handlers_with_its_output_flushed(tmp_path):
    """`entry` skips the interpreter's teardown (os._exit): what a normal exit does must still happen."""
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  preset: micro\n")
    out = _console_script("config", str(path))  # stdout is a pipe: block-buffered until flushed
    assert out.returncode == 0, out.stderr
    assert "resolved_model:" in out.stdout and out.stdout == _run("config", str(path)).stdout  # all of it
    marker = tmp_path / "handler-ran"
    code = ("import atexit, pathlib, sys; from scalelab import cli; "
            f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes')); "
            "sys.stdout.write('written, not flushed'); "
            "sys.argv = ['scalelab', 'config', '--set', 'model.preset=gigantic']; cli.entry()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "gigantic" in done.stderr  # main's code: a config error
    assert marker.read_text() == "yes" and done.stdout == "written, not flushed"


def test_unknown_field_is_a_clear_config_error():
    out = _run("config", "--set", "optim.learning_rate=0.1")
    assert out.returncode == 2
    assert "optim.learning_rate: unknown field" in out.stderr


def test_check_verifies_the_cached_step():
    out = _run("check", "--preset", "micro", "--batch", "9", "--micro-batch", "4", "--block-size", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK:")
    err = float(out.stdout.split("max relative gradient error ")[1].split()[0])
    assert err < 1e-9
