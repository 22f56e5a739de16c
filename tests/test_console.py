"""scalelab.console: the user's lines reach the terminal, everything else the log file; the run table."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from scalelab.console import Console, LiveView, RunTable

CHILD = textwrap.dedent("""
    import logging, os, subprocess, sys
    from scalelab.console import session
    logging.basicConfig(stream=sys.stderr)
    with session(sys.argv[1]) as console:
        print("raw print")
        sys.stderr.write("raw stderr\\n")
        os.write(1, b"raw fd write\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        logging.getLogger("ray").warning("a library's warning")
        console.say("for the user [not markup]")
    print("after the session")
""")


def test_session_sends_raw_output_to_the_log_and_user_lines_to_the_terminal(tmp_path):
    log = tmp_path / "run" / "console.log"
    out = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["for the user [not markup]", "after the session"], out.stdout
    assert out.stderr == ""
    text = log.read_text()
    for raw in ("raw print", "raw stderr", "raw fd write", "a child process", "a library's warning"):
        assert raw in text, raw
    assert "for the user" not in text and "after the session" not in text


def test_a_second_session_appends_to_the_same_log(tmp_path):
    log = tmp_path / "console.log"
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    assert log.read_text().count("raw fd write") == 2 and log.read_text().count("===== scalelab") == 2


def test_verbose_keeps_the_raw_stream_on_the_terminal(tmp_path):
    code = CHILD.replace("session(sys.argv[1])", "session(sys.argv[1], verbose=True)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.log")], capture_output=True,
                         text=True, timeout=120)
    assert "raw print" in out.stdout and "a child process" in out.stdout and "raw stderr" in out.stderr
    assert not (tmp_path / "x.log").exists()


def test_run_table_rate_eta_and_metric():
    table = RunTable("eval/zeroshot/test/top1")
    row = table.row("d1-nano-b64", steps=100, batch=64)
    table.update("d1-nano-b64", {"step": 40, "train/loss": 3.5, "train/samples_per_s_current": 320.0,
                                 "train/samples_per_s": 100.0})
    assert (row.step, row.loss, row.rate) == (40, 3.5, 320.0)
    assert row.eta_s == (100 - 40) * 64 / 320.0  # from the current rate, not the average
    table.update("d1-nano-b64", {"step": 100, "eval/zeroshot/test/top1": 0.61})
    assert row.eta_s == 0.0 and row.metric == 0.61 and row.loss == 3.5  # a report without loss keeps it
    line = table.lines()[1]
    assert line.split()[:3] == ["d1-nano-b64", "PENDING", "100/100"] and line.endswith("0.6100")


def test_plain_view_prints_on_state_changes_and_at_most_every_interval():
    out = io.StringIO()
    table = RunTable("m")
    table.row("a", steps=10, batch=8)
    with LiveView(Console(out), table, interval=3600) as view:
        assert out.getvalue() == ""  # not a terminal: no live display
        view.changed(force=True)
        view.changed()  # within the interval: not printed
        table.row("a").state = "TERMINATED"
        view.say("[a] an event")
    printed = out.getvalue()
    assert printed.count("--- ") == 2  # the forced one and the final one on exit
    assert "--- 1/1 runs ended ---" in printed and "[a] an event" in printed
