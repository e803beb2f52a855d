"""Where per-scene work runs: a dask LocalCluster by default, an existing scheduler, or a
dask-jobqueue cluster (SLURM/PBS/...) — the same task functions in every case.

``cluster.n_workers: 0`` runs the tasks in this process, one after another (debugging, tests).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable

from tqdm import tqdm

log = logging.getLogger("lift3d")


class TaskError(RuntimeError):
    """A per-scene task failed; the message names the task and the original error."""


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
            raise RuntimeError("cluster.jobqueue needs the package dask-jobqueue: pip install 'lift3d[slurm]'") from None
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
    lc = LocalCluster(n_workers=int(cluster.get("n_workers", 2)),
                      threads_per_worker=int(cluster.get("threads_per_worker", 1)),
                      processes=True, memory_limit=cluster.get("memory_limit", "4GiB"),
                      dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()


def run_tasks(client, fn: Callable, tasks: Iterable[tuple[str, tuple]], desc: str,
              unit: str = "scene", on_result: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run ``fn(*args)`` for each (name, args); progress bar with rate and ETA; results by name.

    The first failure cancels what is left and raises TaskError naming the task. Results
    already finished stay written (each task writes its own part), so a re-run resumes.
    """
    tasks = list(tasks)
    results: dict[str, Any] = {}
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
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

        futures = {client.submit(fn, *args, key=f"{desc}-{name}-{id(tasks)}", pure=False): name
                   for name, args in tasks}
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
        log.debug("%s: %d tasks in %.1f s", desc, len(results), time.perf_counter() - t0)
