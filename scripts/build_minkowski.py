#!/usr/bin/env python3
"""Build MinkowskiEngine 0.5.4 once, cache the wheel, install it into this interpreter.

Run with the *runtime* environment's python (the one that will import MinkowskiEngine):

    .venv/bin/python scripts/build_minkowski.py [--cache DIR] [--cuda auto|yes|no]

Why a script: the PyPI sdist does not install with plain pip (its setup.py imports
numpy.distutils when no --blas is given, which is gone with numpy 2 / new setuptools), and
it needs the Python 3.10+ `collections.abc` fix.  What it does (docs/install.md):

1. key = ME version, python tag, torch version, CUDA version (or cpu);
   the wheel is cached at <cache>/wheels/<key>/ and reused on every later set-up;
2. otherwise: ensure a system BLAS (Debian `libopenblas-dev`, installed with apt-get when
   running as root), download the sdist from PyPI and check its sha256, patch the five
   `from collections import Sequence` imports, and run
   `setup.py bdist_wheel [--cpu_only] --blas=openblas` in a build venv holding numpy<2 and
   setuptools<70 that sees the runtime torch through a .pth file (the same torch, not a copy);
3. pip-install the wheel (no deps) and import-check it with a tiny sparse convolution.

Any failure stops with a message naming the step that failed and what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ME_VERSION = "0.5.4"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/21/5c/"
    "c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz"
)
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
HERE = Path(__file__).resolve().parent
BUILD_REQUIREMENTS = HERE.parent / "requirements" / "build-minkowski.txt"

# The five modules that still import abstract base classes from `collections`.
ABC_FIX_FILES = [
    "MinkowskiEngine/MinkowskiKernelGenerator.py",
    "MinkowskiEngine/MinkowskiCommon.py",
    "MinkowskiEngine/MinkowskiCoordinateManager.py",
    "MinkowskiEngine/MinkowskiTensorField.py",
    "MinkowskiEngine/utils/quantization.py",
]


class SetupError(RuntimeError):
    pass


def fail(step: str, detail: str, todo: str) -> None:
    raise SetupError(f"MinkowskiEngine set-up failed at step '{step}': {detail}\n  What to do: {todo}")


def run(cmd: list[str], step: str, todo: str, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    res = subprocess.run(cmd, **kw)
    if res.returncode != 0:
        fail(step, f"command exited with {res.returncode}: {' '.join(map(str, cmd))}", todo)


def torch_info() -> tuple[str, str | None]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - set-up order guarantees torch
        fail("inspect torch", str(exc), "install torch into this environment first (make install)")
    return torch.__version__, torch.version.cuda


def want_cuda(mode: str, torch_cuda: str | None) -> bool:
    if mode == "no":
        return False
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc")
    has_nvcc = Path(nvcc).exists() if nvcc else False
    if mode == "yes":
        if not (torch_cuda and has_nvcc):
            fail(
                "choose build",
                f"--cuda yes but torch CUDA={torch_cuda} nvcc={'found' if has_nvcc else 'missing'}",
                "use a CUDA build of torch and put nvcc on PATH (or CUDA_HOME)",
            )
        return True
    # auto: a CUDA build only where it can be used: nvcc, a CUDA torch, and a visible GPU.
    gpu = (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )
    return bool(torch_cuda and has_nvcc and gpu)


def wheel_key(torch_version: str, cuda: str | None) -> str:
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    tv = re.sub(r"[^0-9A-Za-z.]+", "_", torch_version)
    return f"me{ME_VERSION}-{py}-torch{tv}-{'cu' + cuda.replace('.', '') if cuda else 'cpu'}-{sysconfig.get_platform()}"


def ensure_blas() -> None:
    """Make sure cblas.h and libopenblas are present; apt-get them as root if not."""

    def present() -> bool:
        headers = list(Path("/usr/include").glob("**/cblas.h"))
        libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        return bool(headers) and "libopenblas.so " in libs.replace("libopenblas.so.0", "")

    if present():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        fail(
            "system BLAS",
            "cblas.h / libopenblas.so not found",
            "install OpenBLAS development files (Debian/Ubuntu: sudo apt-get install libopenblas-dev) and re-run",
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], "system BLAS (apt-get update)", "check network access to Debian mirrors", env=env)
    run(
        ["apt-get", "install", "-y", "-qq", "libopenblas-dev"],
        "system BLAS (apt-get install libopenblas-dev)",
        "install libopenblas-dev by hand and re-run",
        env=env,
    )
    if not present():
        fail(
            "system BLAS",
            "libopenblas-dev installed but cblas.h/libopenblas.so still not found",
            "check the OpenBLAS installation",
        )


def download_sdist(dest: Path) -> Path:
    """The sdist from PyPI, or from the file LIFT3D_ME_SDIST names (machines without internet);
    either way checked against SDIST_SHA256."""
    target = dest / "MinkowskiEngine-0.5.4.tar.gz"
    local = os.environ.get("LIFT3D_ME_SDIST")
    if local:
        if not Path(local).is_file():
            fail("local sdist", f"LIFT3D_ME_SDIST={local}: no such file", "bring MinkowskiEngine-0.5.4.tar.gz along")
        shutil.copyfile(local, target)
    else:
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=120) as resp:
                target.write_bytes(resp.read())
        except OSError as exc:
            fail("download sdist", f"{SDIST_URL}: {exc}", "check access to PyPI (files.pythonhosted.org)")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        fail(
            "download sdist",
            f"sha256 {digest} != expected {SDIST_SHA256}",
            "re-run; if it persists the download is tampered",
        )
    return target


def patch_sources(src: Path) -> None:
    for rel in ABC_FIX_FILES:
        path = src / rel
        text = path.read_text()
        new = text.replace(
            "from collections import Sequence, namedtuple",
            "from collections import namedtuple\nfrom collections.abc import Sequence",
        )
        new = new.replace("from collections import Sequence\n", "from collections.abc import Sequence\n")
        if new == text:
            fail(
                "patch sources",
                f"{rel}: expected `from collections import Sequence` not found",
                "the sdist differs from 0.5.4 as released; check SDIST_SHA256",
            )
        path.write_text(new)


def build_wheel(src: Path, out: Path, cuda: bool, cache: Path, key: str) -> Path:
    benv = cache / "build-env" / key
    bpy = benv / "bin" / "python"
    if not bpy.exists():
        run([sys.executable, "-m", "venv", str(benv)], "create build venv", f"remove {benv} and re-run")
        run(
            [str(bpy), "-m", "pip", "install", "-q", "-r", str(BUILD_REQUIREMENTS)],
            "install build requirements",
            f"check PyPI access; requirements in {BUILD_REQUIREMENTS}",
        )
    # The build venv sees the runtime torch (appended to sys.path after its own numpy<2, setuptools<70).
    site = Path(
        subprocess.check_output(
            [str(bpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "lift3d_runtime_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    args = [str(bpy), "setup.py", "bdist_wheel", "--dist-dir", str(out), "--blas=openblas"]
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    if cuda:
        args.append("--force_cuda")
        # CUDA 12/13 fixes without editing sources: thrust headers and no NVTX (issues 543, 601, 614, 621, 632).
        env["NVCC_APPEND_FLAGS"] = (
            env.get("NVCC_APPEND_FLAGS", "") + " -include thrust/execution_policy.h -include thrust/remove.h"
            " -include thrust/unique.h -DTHRUST_IGNORE_CUB_VERSION_CHECK"
        ).strip()
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        env["USE_NVTX"] = "0"
    else:
        args.append("--cpu_only")
    log = out / "build.log"
    print(
        f"building MinkowskiEngine {ME_VERSION} ({'CUDA' if cuda else 'CPU'}); about 12 min on 2 cores; log: {log}",
        flush=True,
    )
    with open(log, "w") as fh:
        res = subprocess.run(args, cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        fail(
            "compile",
            f"setup.py bdist_wheel exited with {res.returncode}; last lines of {log}:\n{tail}",
            "read the log; a missing compiler needs g++ (apt-get install g++), a missing cblas.h needs libopenblas-dev",
        )
    wheels = sorted(out.glob("MinkowskiEngine-*.whl"))
    if not wheels:
        fail("compile", f"no wheel in {out}", f"see {log}")
    return wheels[0]


SMOKE = """
import torch, MinkowskiEngine as ME
c = torch.IntTensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]])
x = ME.SparseTensor(torch.ones(3, 2), coordinates=c)
y = ME.MinkowskiConvolution(2, 3, kernel_size=3, dimension=3)(x)
y.F.sum().backward()
print('MinkowskiEngine', ME.__version__, 'ok, out', tuple(y.F.shape))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("LIFT3D_CACHE", str(Path.home() / ".cache" / "lift3d")))
    ap.add_argument("--cuda", choices=["auto", "yes", "no"], default=os.environ.get("LIFT3D_ME_CUDA", "auto"))
    a = ap.parse_args()
    cache = Path(a.cache).expanduser()
    try:
        tv, tcuda = torch_info()
        cuda = want_cuda(a.cuda, tcuda)
        key = wheel_key(tv, tcuda if cuda else None)
        wdir = cache / "wheels" / key
        wheels = sorted(wdir.glob("MinkowskiEngine-*.whl"))
        if wheels:
            print(f"MinkowskiEngine: cached wheel {wheels[0]}")
        else:
            ensure_blas()
            with tempfile.TemporaryDirectory(prefix="me-build-") as tmp:
                tmp = Path(tmp)
                sdist = download_sdist(tmp)
                with tarfile.open(sdist) as tf:
                    tf.extractall(tmp, filter="data")
                src = tmp / f"MinkowskiEngine-{ME_VERSION}"
                patch_sources(src)
                staging = cache / "wheels" / (key + ".partial")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                build_wheel(src, staging, cuda, cache, key)
                shutil.rmtree(wdir, ignore_errors=True)
                staging.rename(wdir)  # the cache entry appears only once complete
            wheels = sorted(wdir.glob("MinkowskiEngine-*.whl"))
        ensure_blas()  # the wheel links libopenblas at run time
        run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels[0])],
            "install wheel",
            f"remove {wdir} and re-run to rebuild",
        )
        run(
            [sys.executable, "-c", SMOKE],
            "import check",
            f"the cached wheel may be from another torch; remove {wdir} and re-run",
        )
    except SetupError as exc:
        print(f"\nERROR: {exc}\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
