"""Where per-scene work runs: a dask LocalCluster by default, an existing scheduler, or a
dask-jobqueue cluster (SLURM/PBS/...) — the same task functions in every case.

``cluster.n_workers: 0`` runs the tasks in this process, one after another (debugging, tests).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

import dask
from dask.distributed import Client, LocalCluster, as_completed

from lift3d.core.errors import TaskError
from lift3d.core.malloc import MALLOC_ENV
from lift3d.core.progress import bar as progress_bar

log = logging.getLogger("lift3d")

# the teacher's and the points' rows are frames.zarr's rows: they never skip a failed task
ROWS_FOLLOW_FRAMES = (
    "re-running redoes only these (skip_failed_scenes applies to frames; this stage keeps every frame of frames.zarr)"
)


@contextmanager
def dask_client(cluster: dict):
    """Yield a dask.distributed Client for the configured cluster, or None for in-process work."""
    if not cluster.get("scheduler") and not cluster.get("jobqueue") and cluster.get("n_workers", 1) == 0:
        yield None
        return
    if cluster.get("scheduler"):
        client = Client(cluster["scheduler"])
        try:
            yield client
        finally:
            client.close()
        return
    if cluster.get("jobqueue"):
        jq = dict(cluster["jobqueue"])
        kind = jq.pop("kind", "slurm")
        jobs = int(jq.pop("jobs", 1))
        try:
            import dask_jobqueue
        except ImportError:
            raise RuntimeError(
                "cluster.jobqueue needs the package dask-jobqueue: .venv/bin/pip install -e '.[slurm]' (lift3d's "
                "slurm extra), or pip install dask-jobqueue"
            ) from None
        classes = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
        if kind not in classes:
            raise RuntimeError(f"cluster.jobqueue.kind: {kind!r}; valid: {', '.join(classes)}")
        jc = getattr(dask_jobqueue, classes[kind])(**jq)
        jc.scale(jobs=jobs)
        client = Client(jc)
        try:
            yield client
        finally:
            client.close()
            jc.close()
        return

    # glibc malloc settings for the workers (lift3d.launch). The nanny's own MALLOC_TRIM_THRESHOLD_
    # of 64 KiB also freezes glibc's mmap threshold at 128 KiB, so every per-frame buffer would be
    # mmap'ed and page-faulted anew (zstd-encoding a frame: 1.16 vs 0.69 ms in this process)
    env = {} if os.environ.get("LIFT3D_MALLOC") == "default" else MALLOC_ENV
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}):
        lc = LocalCluster(
            n_workers=int(cluster.get("n_workers", 2)),
            threads_per_worker=int(cluster.get("threads_per_worker", 1)),
            processes=True,
            memory_limit=cluster.get("memory_limit", "4GiB"),
            dashboard_address=None,
            # a failed task's "Compute Failed" report (an ERROR with the worker's traceback) would repeat
            # the one line run_tasks gives for it; -v (debug logging) shows the workers' logs
            silence_logs=logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
        )
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()


def init_worker(module: str, dask_worker=None) -> None:
    """On a dask worker (``client.run`` passes ``dask_worker``): OpenCV gets as many threads as
    the worker has (cv2 defaults to every core, which oversubscribes a machine shared by several
    workers), and ``module`` is imported."""
    import cv2

    cv2.setNumThreads(max(1, int(dask_worker.state.nthreads)))
    importlib.import_module(module)


class TaskFailures(TaskError):
    """Some tasks failed after every task ran; ``failures`` maps each failed task to its error."""

    def __init__(self, desc: str, failures: dict[str, str], done: int, hint: str = ""):
        self.desc, self.failures, self.done = desc, dict(sorted(failures.items())), done
        total = len(failures) + done
        tail = f" ({hint})" if hint else ""
        if len(self.failures) == 1:  # one line: the task, the file and the reason
            ((name, why),) = self.failures.items()
            msg = f"{desc}: task {name} failed ({total - 1} other(s) kept): {why}{tail}"
        else:
            # the first line names the first failure (a log's last line is often all a user reads),
            # then every failed task, one per line
            first, why = next(iter(self.failures.items()))
            lines = "\n".join(f"  {name}: {why}" for name, why in self.failures.items())
            msg = f"{desc}: {len(failures)} of {total} tasks failed (the others are kept), first {first}: {why}"
            msg += f"\n{lines}" + (f"\n{hint}" if hint else "")
        super().__init__(msg)


def describe(exc: BaseException) -> str:
    """One line for a failed task: the error's own message (it names the file), with its type."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"


def run_tasks(
    client,
    fn: Callable,
    tasks: Iterable[tuple[str, tuple]],
    desc: str,
    unit: str = "scene",
    on_result: Callable[[str, Any], None] | None = None,
    timings: dict | None = None,
    resources: dict | None = None,
) -> dict[str, Any]:
    """Run ``fn(*args)`` for each (name, args); progress bar with rate and ETA; results by name.

    Every task runs, whatever happens to the others: a failed task does not stop the rest (each
    task writes its own part, so the good work is kept). When some failed, :class:`TaskFailures`
    is raised at the end, listing every failed task with its error (one line each; the traceback
    is logged at debug level, shown with ``-v``).
    ``timings``, when given, receives ``tasks``: the seconds from the first task submitted (after
    the workers are warmed up) to the last result.
    ``resources`` (e.g. {"GPU": 1}) is what each task takes of the workers' declared resources
    (``dask worker --resources GPU=1``). Checked against the connected workers before submitting;
    workers that connect later (a jobqueue) are not checked, so their tasks wait for one that has
    the resources.
    """
    tasks = list(tasks)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    bar = progress_bar(len(tasks), desc, unit)
    t0 = time.perf_counter()

    def collect(outcomes) -> None:
        """(name, a call giving its result) in completion order: every task is waited for."""
        for name, get in outcomes:
            try:
                results[name] = get()
            except Exception as exc:  # noqa: BLE001 - reported with the others at the end
                failures[name] = describe(exc)
                log.debug("%s: task %r failed", desc, name, exc_info=exc)
            else:
                if on_result:
                    on_result(name, results[name])
            bar.update(1)

    try:
        if client is None:
            collect((name, lambda args=args: fn(*args)) for name, args in tasks)
        else:
            # import the task's module and pin OpenCV's threads once per worker, before any task:
            # the first task on a fresh worker would otherwise pay the imports inside its own time
            client.run(init_worker, fn.__module__)
            t0 = time.perf_counter()
            if resources:  # tasks whose resources no connected worker has would wait forever: say so
                try:
                    info = client.scheduler_info(n_workers=-1)  # newer distributed lists only 5 by default
                except TypeError:
                    info = client.scheduler_info()
                have = [w.get("resources", {}) for w in info.get("workers", {}).values()]
                if have and not any(all(r.get(k, 0) >= v for k, v in resources.items()) for r in have):
                    raise TaskError(
                        f"{desc}: the tasks need worker resources {resources}, but no worker has them "
                        f"(workers declare {have[:3]}): start the workers with --resources, or unset "
                        f"cluster.gpu_resource"
                    )
            futures = {
                client.submit(fn, *args, key=f"{desc}-{name}-{id(tasks)}", pure=False, resources=resources): name
                for name, args in tasks
            }
            collect((futures[fut], fut.result) for fut in as_completed(list(futures)))
    finally:
        bar.close()
        if timings is not None:
            timings["tasks"] = time.perf_counter() - t0
        log.debug("%s: %d tasks in %.1f s", desc, len(results), time.perf_counter() - t0)
    if failures:
        raise TaskFailures(desc, failures, len(results))
    return results


def write_failure_report(workdir: Path, stage: str, failures: dict[str, dict[str, str]], skipped: bool) -> Path:
    """``<workdir>/logs/<stage>-failures.json``, for scripts and SLURM epilogues: per group, the
    failed tasks and their errors (empty when every task succeeded), and whether they were skipped."""
    path = Path(workdir) / "logs" / f"{stage}-failures.json"
    report = {
        "stage": stage,
        "failed": sum(len(f) for f in failures.values()),
        "skipped": bool(skipped),
        "groups": {g: [{"task": k, "error": v} for k, v in sorted(f.items())] for g, f in sorted(failures.items())},
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a full disk must not hide the failure being reported
        log.warning("%s: could not write the failure report %s: %s", stage, path, exc)
    return path


def run_groups(
    workdir: Path, stage: str, jobs: list[tuple[str, Callable[[dict], Any]]], skip: bool = False, hint: str = ""
) -> list:
    """Run ``job(failures)`` for each (group name, job) of a per-scene stage. A group whose tasks
    failed does not stop the next one; every failure is written to the stage's failure report and,
    when any, raised together at the end (one line each)."""
    rows, failures, errors = [], {}, []
    try:
        for name, job in jobs:
            try:
                rows.append(job(failures.setdefault(name, {})))
            except TaskFailures as exc:
                failures[name].update(exc.failures)
                errors.append(exc)
    finally:
        write_failure_report(workdir, stage, failures, skip)
    if errors:
        raise TaskFailures(
            stage,
            {f"{e.desc}/{k}": v for e in errors for k, v in e.failures.items()},
            sum(e.done for e in errors),
            hint=hint,
        )
    return rows
