"""The ``lift3d`` command line: run stages, show their status, generate and inspect data."""

from __future__ import annotations

import logging
import os
import time
import warnings

import click

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.core.malloc import reexec_tuned

log = logging.getLogger("lift3d")

config_opt = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="A YAML file that sets only what it changes from stages.yaml.",
)
override_opt = click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override one value (YAML syntax), e.g. -o points.voxel_size=0.05. Repeatable.",
)


def _load(config_path, overrides) -> dict:
    try:
        return C.load(config_path, overrides)
    except C.ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from None


def _summary(stage: str, rows, seconds: float) -> None:
    click.echo(f"\n== {stage}: summary ({seconds:.1f} s) ==")
    if not rows:
        return
    keys = [k for k in rows[0] if k != "dataset"]
    head = ["dataset"] + keys
    table = [[str(r.get(k, "")) if not isinstance(r.get(k), float) else f"{r[k]:.2f}" for k in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def _fail(what: str, exc: Exception):
    """One clear line for the user; the traceback with -v."""
    if logging.getLogger("lift3d").isEnabledFor(logging.DEBUG):
        raise exc
    raise click.ClickException(f"{what} failed: {type(exc).__name__}: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """lift3d: pretrain sparse 3D networks from frozen 2D networks through RGB-D frames.

    Stages (stages.yaml): frames -> teacher, points -> pretrain -> finetune, distill2d.
    """
    if not verbose:
        # third-party warnings (MinkowskiEngine's CPU_ONLY notice at every import, deprecations) stay
        # off the terminal; -v shows them. Child processes (dask workers, verdict jobs) inherit this.
        warnings.filterwarnings("ignore", module=r"(?!lift3d)")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # dask's own chatter (its loggers set their own levels): warnings and up only
        quiet = ("distributed", "tornado", "asyncio")
        # When a write fails inside zarr's event loop (disk full), its sibling writes are abandoned and
        # asyncio reports them, with tracebacks, when they are garbage-collected: echoes of the error the
        # stage already reported in one line. Shown with -v.
        abandoned = (
            "Future exception was never retrieved",
            "Task was destroyed but it is pending",
            "Task exception was never retrieved",
        )

        def keep(record: logging.LogRecord) -> bool:
            if record.name == "asyncio" and str(record.msg).startswith(abandoned):
                return False
            return record.levelno >= logging.WARNING or not record.name.startswith(quiet)

        for handler in logging.getLogger().handlers:
            handler.addFilter(keep)


@main.command()
@click.argument("stage", type=click.Choice(list(S.ORDER) + ["all"]))
@config_opt
@override_opt
@click.option("--rebuild", is_flag=True, help="Replace complete stores made by another configuration (rebuild: true).")
def run(stage, config_path, overrides, rebuild):
    """Run STAGE (or `all`: every stage that is not done, in order)."""
    cfg = _load(config_path, overrides)
    if rebuild:
        cfg["rebuild"] = True
    todo = [stage] if stage != "all" else list(S.ORDER)
    for name in todo:
        if stage == "all":
            state, _ = S.stage_status(cfg, name)
            if state in ("done", "not used"):
                click.echo(f"{name}: {state}, skipped")
                continue
        t0 = time.perf_counter()
        try:
            rows = S.run_stage(cfg, name)
        except Exception as exc:
            _fail(name, exc)
        _summary(name, rows, time.perf_counter() - t0)


def _sparse_build() -> str:
    """One line about the sparse-convolution library this environment has."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its CPU_ONLY notice: said here in words instead
            import MinkowskiEngine as ME  # heavy: only status reports it
    except ImportError as exc:
        return f"MinkowskiEngine is not importable ({exc}): run 'make install'"
    kind = "CUDA" if ME.is_cuda_available() else "CPU only (compiled without CUDA)"
    return f"MinkowskiEngine {ME.__version__}, {kind}"


@main.command()
@config_opt
@override_opt
def status(config_path, overrides):
    """Each stage as done / out of date / missing, and why."""
    cfg = _load(config_path, overrides)
    click.echo(f"workdir: {C.workdir(cfg)}")
    click.echo(f"build:   {_sparse_build()}")
    upstream_bad: set[str] = set()
    graph = cfg["graph"]
    for name in S.ORDER:
        state, why = S.stage_status(cfg, name)
        stale_up = [u for u in graph[name]["needs"] if u in upstream_bad]
        if state == "done" and stale_up:
            state, why = "out of date", [f"upstream stage {', '.join(stale_up)} is not done"]
        if state not in ("done", "not used"):  # not used: e.g. fit2d without a fitted teacher
            upstream_bad.add(name)
        click.echo(f"{name:10s} {state}")
        for line in why:
            click.echo(f"{'':10s}   {line}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (ScanNet raw layout).")
@click.option("--scenes", default=6, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def synth(out, scenes, seed):
    """Generate the procedural indoor dataset in ScanNet's raw format (.sens, labelled meshes)."""
    from lift3d.pipeline.synthetic import generate

    generate(out, scenes=scenes, seed=seed)
    click.echo(f"wrote {scenes} scenes to {out}")


@main.command(context_settings={"ignore_unknown_options": True})  # so that FRAME may be written -1
@click.argument("dataset")
@click.argument("frame", type=int)
@click.option("--out", "out_png", default="show.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--ply", default=None, type=click.Path(dir_okay=False), help="Also export the frame's points as PLY.")
@config_opt
@override_opt
def show(dataset, frame, out_png, ply, config_path, overrides):
    """Write a PNG of frame FRAME of DATASET: RGB, depth and its points from a second viewpoint."""
    if frame < 0:
        raise click.BadParameter(f"{frame}: frames are numbered from 0", param_hint="FRAME")
    from lift3d.pipeline.show import show as show_frame

    cfg = _load(config_path, overrides)
    try:
        show_frame(cfg, dataset, frame, out_png, ply=ply)
    except Exception as exc:
        _fail("show", exc)
    click.echo(f"wrote {out_png}" + (f" and {ply}" if ply else ""))


@main.command()
@click.argument("stage", type=click.Choice(["pretrain"]))
@click.option("--name", default=None, help="A grid from the config's sweeps: section.")
@config_opt
@click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=V1,V2",
    help="A value list to sweep (comma-separated); repeat for a grid. Fixed values work too.",
)
def sweep(stage, name, config_path, overrides):
    """Run STAGE for every combination of the swept values, against the same caches."""
    from lift3d.train.sweep import SweepError, run_sweep

    t0 = time.perf_counter()
    try:
        rows = run_sweep(stage, config_path, list(overrides), name)
    except (SweepError, C.ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    _summary(f"sweep {stage}", rows, time.perf_counter() - t0)


@main.command(name="export")
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["pointcontrast"]), default="pointcontrast", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the exported state dict.")
def export_cmd(checkpoint, fmt, out):
    """Export a pretrained 3D network (run folder, model.pt or checkpoint.pt) for another code base."""
    from lift3d.train.export import ExportError, export

    try:
        rep = export(checkpoint, out, fmt)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {rep['out']}: {rep['keys']} keys, {rep['parameters']:,} parameters ({rep['model']}, {fmt})")


class _EvalGroup(click.Group):
    """``lift3d eval teacher ...`` or ``lift3d eval CHECKPOINT ...`` (any other first word is a
    checkpoint path, handled by the ``checkpoint`` subcommand)."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "checkpoint", self.commands["checkpoint"], args
        return super().resolve_command(ctx, args)


@main.group(name="eval", cls=_EvalGroup)
def eval_():
    """Evaluate a fine-tuned checkpoint (lift3d eval CHECKPOINT) or a teacher's 2D pseudo-labels."""


@eval_.command(name="checkpoint")
@click.argument("checkpoint", type=click.Path())
@click.option("--split", default="val", show_default=True, type=click.Choice(["train", "val"]))
@click.option("--dataset", default=None, help="The labelled dataset (default: finetune.dataset, else the first).")
@click.option("--out", "out_json", default=None, type=click.Path(dir_okay=False), help="Also write the scores as JSON.")
@config_opt
@override_opt
def eval_checkpoint_cmd(checkpoint, split, dataset, out_json, config_path, overrides):
    """Scores of a fine-tuned network (run folder or model.pt) on a labelled split."""
    import json

    from lift3d.core.metrics import format_table
    from lift3d.train.finetune import eval_checkpoint

    cfg = _load(config_path, overrides)
    try:
        res = eval_checkpoint(cfg, checkpoint, split, dataset)
    except Exception as exc:
        _fail("eval", exc)
    click.echo(format_table(res, f"{res['checkpoint']} on {res['scenes']} {split} scenes"))
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(res, fh, indent=1)
        click.echo(f"wrote {out_json}")


@eval_.command(name="teacher")
@click.option("--dataset", default=None, help="Dataset name (default: the first configured).")
@config_opt
@override_opt
def eval_teacher_cmd(dataset, config_path, overrides):
    """The teacher's 2D pseudo-label mIoU against the dataset's ground-truth 2D labels."""
    from lift3d.pipeline.teachers.evaluate import eval_teacher

    cfg = _load(config_path, overrides)
    try:
        res = eval_teacher(cfg, dataset or cfg["datasets"][0]["name"])
    except Exception as exc:
        _fail("eval teacher", exc)
    for key, val in res.items():
        click.echo(f"{key}: {val}")


@main.command()
@click.option("--seeds", default="0", show_default=True, help="Comma-separated fine-tuning seeds.")
@click.option(
    "--la-points",
    default=20,
    show_default=True,
    type=int,
    help="Labelled vertices per training scene (limited annotations); 0 = all labels.",
)
@click.option(
    "--methods",
    default="ppnce,soft_ce",
    show_default=True,
    help="Pretraining arms: ppnce, soft_ce, ppkd (this config's teacher), ppnce_imagenet (EfficientNet-Lite0).",
)
@click.option(
    "--rooms", default=0, show_default=True, type=int, help="Fine-tune on the first N training rooms (0 = all)."
)
@click.option(
    "--controls/--no-controls", default=True, show_default=True, help="Shuffled-pairs PPKT and random-network probes."
)
@click.option("--ceiling/--no-ceiling", default=True, show_default=True, help="The supervised ceiling arm.")
@click.option("--rebuild", is_flag=True, help="Replace complete stores made by another configuration (rebuild: true).")
@click.option(
    "--distill2d/--no-distill2d",
    "distill",
    default=True,
    show_default=True,
    help="Also run 3D-to-2D distillation from the first method's fine-tuned network (2D mIoU rows).",
)
@click.option(
    "--jobs",
    default=min(2, os.cpu_count() or 1),
    show_default=True,
    type=int,
    help="Stage runs at once, one thread each (independent runs; results do not depend on it).",
)
@config_opt
@override_opt
def verdict(seeds, la_points, methods, rooms, controls, ceiling, rebuild, distill, jobs, config_path, overrides):
    """Scratch, each pretraining method, the supervised ceiling, controls and baselines, paired by seed."""
    from lift3d.train.verdict import format_verdict, run_verdict

    cfg = _load(config_path, overrides)
    if rebuild:  # an arm's teacher cache (ppnce_imagenet) made by another configuration is replaced
        cfg["rebuild"] = True
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.ClickException(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    try:
        res = run_verdict(
            cfg,
            seed_list,
            la_points or None,
            tuple(m.strip() for m in methods.split(",") if m.strip()),
            distill,
            jobs,
            rooms=rooms or None,
            controls=controls,
            ceiling=ceiling,
        )
    except Exception as exc:
        _fail("verdict", exc)
    click.echo("\n" + format_verdict(res))
    click.echo(f"\n(verdict took {res['seconds']:.0f} s; {C.workdir(cfg)}/verdict.md)")


@main.command()
@click.option("--dataset", default=None, help="Dataset name (default: finetune.dataset, else the first).")
@click.option("--points", "points", multiple=True, type=int, help="LA file(s): labelled vertices per scene (repeat).")
@click.option(
    "--percent", "percent", multiple=True, type=float, help="LR file(s): percent of training scenes (repeat)."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_opt
@override_opt
def limited(dataset, points, percent, seed, out, config_path, overrides):
    """Write data-efficient benchmark files (ScanNet's formats) for a labelled dataset:
    pointsN.pth (limited annotations) and scenes_P.txt (limited reconstructions)."""
    from pathlib import Path

    from lift3d.train.finetune import dataset_entry
    from lift3d.train.scenes import LabelledDataset, make_la_file, make_lr_file

    cfg = _load(config_path, overrides)
    if dataset:
        cfg["finetune"]["dataset"] = dataset
    try:
        ds = LabelledDataset(dataset_entry(cfg), C.workdir(cfg))
        train = ds.split("train")
        for n in points:
            click.echo(f"wrote {make_la_file(ds, train, n, seed, Path(out) / f'points{n}.pth')}")
        for pc in percent:
            click.echo(f"wrote {make_lr_file(train, pc, seed, Path(out) / f'scenes_{pc:g}.txt')}")
    except Exception as exc:
        _fail("limited", exc)


if __name__ == "__main__":  # pragma: no cover - ``python -m lift3d.cli`` (torchrun): as the console script
    reexec_tuned()
    main(prog_name="lift3d")
