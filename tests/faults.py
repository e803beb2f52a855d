"""Helpers for the fault tests (not a test module): run `lift3d` as its own process, optionally
without the privilege to ignore file permissions, or under a file size limit.

Permissions. These tests usually run as root, and chmod does not stop root. A child that must
meet a permission error drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability
bounding set before exec (so the new program never has them): it is still root, owns the test
files, but the permission bits now apply to it (``nobody`` would not do: the interpreter lives
under /root, mode 0700). Run as an ordinary user, chmod stops the child anyway.

Disk full. ``RLIMIT_FSIZE`` with SIGXFSZ ignored makes a write past the limit fail with EFBIG
("File too large"), the way a full disk makes it fail with ENOSPC; no mount is needed.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_override() -> None:
    """In the child, before exec: make permission bits apply even to root."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def can_drop_privileges() -> bool:
    if os.geteuid() != 0:
        return True  # chmod already stops an ordinary user
    r = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_override, capture_output=True)
    return r.returncode == 0


def run_lift3d(
    args, unprivileged: bool = False, fsize: int | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m lift3d.cli ARGS`` in a child process; stdout and stderr together in ``.out``.
    ``unprivileged``: file permissions apply to the child (see above); ``fsize``: RLIMIT_FSIZE."""
    if unprivileged and os.geteuid() == 0 and not can_drop_privileges():
        pytest.skip("running as root without CAP_SETPCAP: cannot make file permissions apply to a child")
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))

    def pre():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if unprivileged and os.geteuid() == 0:
            _drop_dac_override()

    res = subprocess.run(
        [sys.executable, "-m", "lift3d.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=pre,
        timeout=timeout,
    )
    res.out = res.stdout
    return res


def error_line(out: str) -> str:
    """The one line the CLI prints for a failure (click: 'Error: <stage> failed: ...')."""
    lines = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return lines[0]
