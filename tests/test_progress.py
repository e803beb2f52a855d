"""Progress bars in a log file: whole lines, no carriage-return redraws."""
import io
import sys

from lift3d import progress


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
