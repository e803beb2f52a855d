"""Where per-scene work runs: a dask LocalCluster by default, an existing scheduler, or a
dask-jobqueue cluster (SLURM/PBS/...) — the same task functions in every case.

``cluster.n_workers: 0`` runs the tasks in this process, one after another (debugging, tests).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable

from lift3d.core.errors import TaskError
from lift3d.core.malloc import MALLOC_ENV
from lift3d.core.progress import bar as progress_bar

log = logging.getLogger("lift3d")


@contextmanager
def dask_client(cluster: dict):
    """Yield a dask.distributed Client for the configured cluster, or None for in-process work."""
    if not cluster.get("scheduler") and not cluster.get("jobqueue") and cluster.get("n_workers", 1) == 0:
        yield None
        return
    from dask.distributed import Client, LocalCluster

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
                "cluster.jobqueue needs the package dask-jobqueue: pip install 'lift3d[slurm]'"
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
    import dask

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
            silence_logs=logging.ERROR,
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

    The first failure cancels what is left and raises TaskError naming the task. Results
    already finished stay written (each task writes its own part), so a re-run resumes.
    ``timings``, when given, receives ``tasks``: the seconds from the first task submitted (after
    the workers are warmed up) to the last result.
    ``resources`` (e.g. {"GPU": 1}) is what each task takes of the workers' declared resources
    (``dask worker --resources GPU=1``). Checked against the connected workers before submitting;
    workers that connect later (a jobqueue) are not checked, so their tasks wait for one that has
    the resources.
    """
    tasks = list(tasks)
    results: dict[str, Any] = {}
    bar = progress_bar(len(tasks), desc, unit)
    t0 = time.perf_counter()
    try:
        if client is None:
            for name, args in tasks:
                try:
                    results[name] = fn(*args)
                except Exception as exc:
                    raise TaskError(f"{desc}: task {name!r} failed: {type(exc).__name__}: {exc}") from exc
                if on_result:
                    on_result(name, results[name])
                bar.update(1)
            return results
        from dask.distributed import as_completed

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
        for fut in as_completed(list(futures)):
            name = futures[fut]
            try:
                results[name] = fut.result()
            except Exception as exc:
                for other in futures:
                    other.cancel()
                raise TaskError(f"{desc}: task {name!r} failed: {type(exc).__name__}: {exc}") from exc
            if on_result:
                on_result(name, results[name])
            bar.update(1)
        return results
    finally:
        bar.close()
        if timings is not None:
            timings["tasks"] = time.perf_counter() - t0
        log.debug("%s: %d tasks in %.1f s", desc, len(results), time.perf_counter() - t0)
