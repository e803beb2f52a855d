"""The console script's malloc settings (lift3d.launch)."""
import os
import subprocess
import sys

from lift3d.launch import MALLOC_ENV, tuned_env


def test_tuned_env_adds_only_what_is_missing_and_respects_opt_out():
    want = {k: str(v) for k, v in MALLOC_ENV.items()}
    assert tuned_env({"PATH": "/bin"}) == {"PATH": "/bin", **want}
    assert tuned_env(dict(want)) is None                        # already set: no second re-exec
    mine = {"MALLOC_TRIM_THRESHOLD_": "12345"}
    assert tuned_env(mine) == {**mine, "MALLOC_MMAP_THRESHOLD_": want["MALLOC_MMAP_THRESHOLD_"]}
    assert tuned_env({"LIFT3D_MALLOC": "default"}) is None


def test_console_entry_reexecutes_once_with_the_settings(tmp_path):
    """The process re-executes itself (same pid, same arguments) with the variables set; a
    module standing in for lift3d.cli reports what it sees."""
    (tmp_path / "probe_cli.py").write_text(
        "import os, sys\n"
        "print('after', os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'),\n"
        "      os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:], flush=True)\n")
    starter = ("import os, sys; from lift3d import launch; print('before', os.getpid(), flush=True); "
               "sys.argv = ['lift3d', 'run', 'frames']; launch.entry('probe_cli')")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "LIFT3D_MALLOC"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", starter], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    before, after = res.stdout.splitlines()
    pid = before.split()[1]
    assert after == f"after {pid} {256 << 20} {1 << 30} ['run', 'frames']"
    env["LIFT3D_MALLOC"] = "default"  # opt-out: no re-exec, the command line runs as it is
    res = subprocess.run([sys.executable, "-c", starter.replace("'run', 'frames'", "'--help'")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "Usage: lift3d" in res.stdout, res.stderr
