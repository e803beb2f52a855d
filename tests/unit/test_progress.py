"""Progress bars in a log file: whole lines, no carriage-return redraws."""

import io
import sys

from lift3d.core import progress


def test_bar_writes_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # a line for every update here
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    b = progress.bar(3, "stage/x", "frame")
    for _ in range(3):
        b.update(1)
    b.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("stage/x") for line in lines)
    assert "3/3" in lines[-1]


def test_lines_on_request_and_disable(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    log = Tty()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("LIFT3D_PROGRESS", "lines")
    b = progress.bar(2, "verdict/x", "step")
    b.update(2)
    b.close()
    assert "\r" not in log.getvalue() and "2/2" in log.getvalue()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    log.truncate(0)
    log.seek(0)
    b = progress.bar(2, "quiet", "step", disable=False)  # the env wins over a caller's disable=False
    b.update(2)
    b.close()
    assert log.getvalue() == ""
