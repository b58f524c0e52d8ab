"""Command line: ``python -m medcomp run params/embedded.yaml`` and friends."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from medcomp.numerics import MODE_PINS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcomp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the notebooks into reports/<run_name>/ and render HTML")
    run.add_argument("params", help="params YAML file, or a preset name from params/ (embedded, kaggle_t4)")
    run.add_argument("--force", action="store_true", help="redo stages that already finished")
    run.add_argument("--only", nargs="+", metavar="STAGE", help="redo only these notebooks (e.g. 01_finetune); later ones then redo on the next full run")
    run.add_argument("--run-dir", help="write here instead of reports/<run_name>/")

    check = commands.add_parser("check", help="validate a params file and exit")
    check.add_argument("params")

    bootstrap = commands.add_parser("bootstrap", help="build and cache the embedded model and dataset")
    bootstrap.add_argument("params", nargs="?", default="embedded")

    sweep = commands.add_parser("sweep", help="one run folder per point of a params grid, and an index comparing them")
    sweep.add_argument("params", help="the base params file or preset")
    sweep.add_argument("--set", dest="settings", action="append", required=True, metavar="KEY=V1,V2",
                       help="a dotted params key and its values; repeat for a grid (e.g. --set seed=0,1,2)")
    sweep.add_argument("--only", nargs="+", metavar="STAGE", help="run only these notebooks at each point")
    sweep.add_argument("--force", action="store_true", help="redo finished stages")
    sweep.add_argument("--sweep-dir", help="write here instead of reports/<run_name>-sweep/")
    sweep.add_argument("--executor", choices=["inline", "local", "slurm"], help="where the points run (default: the params' sweep.executor, inline)")
    for option, kind, what in (("max-parallel", int, "points at once (local)"), ("partition", str, "Slurm partition"),
                               ("time-minutes", int, "time limit of one point"), ("gpus-per-point", int, "GPUs of one point"),
                               ("cpus-per-point", int, "CPUs of one point's job"), ("mem-gb", int, "memory of one point's job, GB")):
        sweep.add_argument(f"--{option}", type=kind, help=f"{what} (default: the params' sweep block)")

    rehearse = commands.add_parser("rehearse", help="run kaggle_t4.yaml end to end on the 32-layer fp16 LLaVA-1.5 stand-in")
    rehearse.add_argument("--work", default="rehearsal", help="folder for the stand-in, its data and the run (default: ./rehearsal)")
    rehearse.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    numerics = commands.add_parser("numerics", help="this CPU's kernel hashes in each mode, and with --emulate on emulated CPUs (QEMU)")
    numerics.add_argument("--emulate", nargs="*", default=[], metavar="CPU",
                          help="QEMU CPU models to compare with this machine (e.g. EPYC-Rome Haswell); needs qemu-user")
    numerics.add_argument("--modes", nargs="+", choices=list(MODE_PINS), help="default: pinned portable default")

    tidy = commands.add_parser("tidy", help="free a finished run's disk: delete the model folders it rebuilds on demand")
    tidy.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or a sweep folder (each of its points)")
    tidy.add_argument("--dry-run", action="store_true", help="list the folders and their sizes; delete nothing")

    docs = commands.add_parser("docs", help="render docs/results.md, docs/params.md and the README's headline from results/ and the schema")
    docs.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed page differs from its rendering")

    args = parser.parse_args(argv)
    from medcomp.params import ParamsError, load_params

    if args.command == "docs":
        from medcomp.results import write_docs

        stale = write_docs(check=args.check)
        for path in stale:
            print(f"{'stale' if args.check else 'rendered'}: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
        return 1 if args.check and stale else 0

    if args.command == "tidy":
        return _tidy([Path(folder) for folder in args.runs], args.dry_run)

    if args.command == "rehearse":
        from medcomp.rehearsal import rehearse as run_rehearsal

        return run_rehearsal(Path(args.work), args.device)

    if args.command == "numerics":
        from medcomp.emulation import COMPARED_MODES, EmulationError, agreement, cpu_summary, fingerprints

        try:
            measured = fingerprints(args.emulate, args.modes or COMPARED_MODES)
        except EmulationError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(cpu_summary(measured).to_string(), agreement(measured).to_string(), sep="\n\n")
        return 0

    try:
        if args.command == "check":
            from medcomp.data import DatasetError, check_layout

            params = load_params(args.params)
            try:
                check_layout(params)
            except DatasetError as error:
                print(f"error: {args.params}: {error}", file=sys.stderr)
                return 2
            print(f"{args.params}: valid (run_name={params.run_name}, world={params.world})")
            return 0
        if args.command == "bootstrap":
            from medcomp.numerics import in_mode, numerics_environment

            params = load_params(args.params)
            if not in_mode(params.runtime.numerics_mode()):  # torch reads the pins when it loads: start afresh with them
                command = [sys.executable, "-m", "medcomp", *(argv if argv is not None else sys.argv[1:])]
                os.execve(sys.executable, command, numerics_environment(params.runtime.numerics_mode()))
            from medcomp.data import prepare_dataset
            from medcomp.embedded import prepare_model_source
            from medcomp.notebook import quiet_libraries

            quiet_libraries()
            import torch

            torch.set_num_threads(params.runtime.threads)  # as the notebook kernels: a sum's bits depend on how it is split
            started = time.perf_counter()
            print("model:", prepare_model_source(params))
            print(f"model ready in {time.perf_counter() - started:.0f} s")
            started = time.perf_counter()
            print("data:", prepare_dataset(params).root)
            print(f"data ready in {time.perf_counter() - started:.0f} s")
            return 0
        if args.command == "sweep":
            from medcomp.executors import SweepSettingsError
            from medcomp.sweep import run_sweep

            where = {key: getattr(args, key) for key in ("executor", "max_parallel", "partition", "time_minutes", "gpus_per_point",
                                                          "cpus_per_point", "mem_gb")}
            try:
                folder = run_sweep(args.params, args.settings, args.only, args.force, Path(args.sweep_dir) if args.sweep_dir else None, where)
            except SweepSettingsError as error:  # before anything was submitted
                print(f"error: {error}", file=sys.stderr)
                return 2
            except RuntimeError as failure:  # a point failed; the others ran and the index shows them
                print(f"error: {failure}", file=sys.stderr)
                return 1
            print(f"[medcomp] sweep index: {folder / 'index.html'}")
            return 0
        from medcomp.runner import run_pipeline

        outcomes = run_pipeline(args.params, force=args.force, only=args.only, run_dir=args.run_dir)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        print(f"  {outcome.stage:<16} {outcome.status:<8} {outcome.seconds:6.0f} s")
    return 1 if any(o.status in ("failed", "incomplete") for o in outcomes) else 0


def _tidy(folders: list[Path], dry_run: bool) -> int:
    """``tidy``: each run folder's rebuildable model folders deleted (or listed); a sweep folder stands for its points."""
    from medcomp.executors import finished
    from medcomp.runs import Run
    from medcomp.stages.materialise import release

    runs = []
    for folder in folders:
        if (folder / "registry.json").exists():
            runs.append(folder)
        elif (folder / "points").is_dir():  # a sweep: its finished points (a running one is not yet)
            points = sorted(path.parent for path in folder.glob("*/registry.json"))
            runs += [point for point in points if finished(point)]
            others = [point.name for point in points if point not in runs]
            if others:
                print(f"[medcomp] left as they are, not finished (a stage is not ok): {', '.join(others)}")
        else:
            print(f"error: {folder}: neither a run folder (no registry.json) nor a sweep folder (no points/)", file=sys.stderr)
            return 2
    total = 0
    for folder in runs:
        for name, path, size in release(Run(folder), dry_run):
            total += size
            print(f"  {'would delete' if dry_run else 'deleted'} {size / 1e9:6.2f} GB  {name}: {path}")
    print(f"[medcomp] {'would free' if dry_run else 'freed'} {total / 1e9:.2f} GB in {len(runs)} run folder(s); "
          "a later stage rebuilds what it needs (medcomp.stages.materialise.ensure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
