"""The console script's malloc settings (lift3d.launch)."""

import os
import subprocess
import sys

from lift3d.launch import MALLOC_ENV, tuned_env


def test_tuned_env_adds_only_what_is_missing_and_respects_opt_out():
    want = {k: str(v) for k, v in MALLOC_ENV.items()}
    assert tuned_env({"PATH": "/bin"}) == {"PATH": "/bin", **want}
    assert tuned_env(dict(want)) is None  # already set: no second re-exec
    mine = {"MALLOC_TRIM_THRESHOLD_": "12345"}
    assert tuned_env(mine) == {**mine, "MALLOC_MMAP_THRESHOLD_": want["MALLOC_MMAP_THRESHOLD_"]}
    assert tuned_env({"LIFT3D_MALLOC": "default"}) is None


def test_console_entry_reexecutes_once_with_the_settings(tmp_path):
    """The process re-executes itself exactly once (same pid, same command line) with the
    variables set, then runs the command; LIFT3D_MALLOC=default runs it without re-executing."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "print('probe', os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'),\n"
        "      os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:], flush=True)\n"
        "from lift3d import launch\n"
        "launch.entry()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "LIFT3D_MALLOC"}
    res = subprocess.run(
        [sys.executable, "-u", str(probe), "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    probes = [line.split(" ", 2) for line in res.stdout.splitlines() if line.startswith("probe ")]
    assert len(probes) == 2 and probes[0][1] == probes[1][1]  # once, same process id
    assert probes[0][2] == "None None ['--help']"
    assert probes[1][2] == f"{256 << 20} {1 << 30} ['--help']"
    assert "Usage: lift3d" in res.stdout
    env["LIFT3D_MALLOC"] = "default"
    res = subprocess.run([sys.executable, str(probe), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.count("probe ") == 1 and "Usage: lift3d" in res.stdout, res.stderr
