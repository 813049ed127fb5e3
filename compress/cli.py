"""The `compress` command.

    compress run pipelines/mobilenetv2-fashion-int8.yaml     # run, evaluate, benchmark, gate
    compress validate pipelines/mobilenetv2-fashion-int8.yaml
    compress list-stages
    compress generate runs/smollm2-int8/int8 "The capital of France is"
    compress inspect runs/mobilenetv2-fashion-int8
    compress compare runs-old/mobilenetv2-fashion-int8 runs/mobilenetv2-fashion-int8 --fail-on 'top1_drop>0.2'

    # finetune / distill on N processes (DDP; gloo on CPU, NCCL on GPUs); README "Multi-GPU distillation"
    accelerate launch --multi_gpu --num_processes 2 -m compress.cli run pipelines/X.yaml

Exit codes (one meaning each; README "Exit codes"):
    0  every gate was checked and holds
    1  a gate is breached (the report names the artifact and what it lost)
    2  the pipeline file, an input it names, or the command line is wrong
    3  a stage or benchmark failed (e.g. export parity)
    4  incomplete: a configured gate could not be checked (--no-eval, a skipped artifact, a missing metric)
    5  internal error (a bug in compress): one paragraph here, the traceback in the run's log or with --debug
    6  the run folder is locked by another `compress run`
  130  interrupted (Ctrl-C); every finished artifact is intact
`compress compare`: 0 no --fail-on threshold breached, 1 one is breached, 2 a bad folder or --fail-on,
    4 a threshold could not be checked (a value missing on one side) and none is breached.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from compress.errors import CompressError, ConfigError, RunLockedError, StageError

if TYPE_CHECKING:
    from compress.config import PipelineConfig
    from compress.runner import Runner

EXIT_OK, EXIT_GATE, EXIT_CONFIG, EXIT_STAGE = 0, 1, 2, 3
EXIT_INCOMPLETE, EXIT_INTERNAL, EXIT_LOCKED, EXIT_INTERRUPTED = 4, 5, 6, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compress",
        description="Staged model compression: prune, distill, quantize, export, benchmark and gate.",
        epilog="Exit codes: 0 every gate checked and holds, 1 a gate is breached, 2 bad pipeline file or arguments, "
        "3 a stage failed, 4 incomplete (a gate could not be checked), 5 internal error (a bug), "
        "6 run folder locked, 130 interrupted.",
    )
    p.add_argument("--debug", action="store_true", help="print the full traceback of an internal error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a pipeline file: stages (cached), evaluation, benchmarks, gates, report",
        description="Run a pipeline. Stages whose inputs and options did not change are cache hits. "
        "Writes runs/<name>/ with every artifact, manifest.json, report.md and a plot.",
    )
    run.add_argument("pipeline", type=Path, help="pipeline YAML file, e.g. pipelines/mobilenetv2-fashion-int8.yaml")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: runs)")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="NAME",
        help="rebuild a stage (by kind or artifact name), or re-measure: 'eval', 'bench'; repeatable",
    )
    run.add_argument(
        "--no-bench", action="store_true", help="skip benchmarks (speed gates without a cached result: not checked)"
    )
    run.add_argument(
        "--no-eval", action="store_true", help="skip evaluation (accuracy gates: not checked, the run is incomplete)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--wait", action="store_true", help="if another run holds the run folder's lock, wait for it (else exit 6)"
    )

    val = sub.add_parser(
        "validate",
        help="check a pipeline file without running anything",
        description="Check a pipeline file: keys, types, stage order, gates, files, sources. Prints the verdict.",
    )
    val.add_argument("pipeline", type=Path)
    val.add_argument("--show-config", action="store_true", help="then print the resolved config (defaults filled in)")

    gen = sub.add_parser(
        "generate",
        help="complete a prompt with a causal-lm artifact (torch folder or ONNX decoder)",
        description="Generate text from any causal-lm artifact of a run, e.g. "
        "compress generate runs/smollm2-int8/int8 'The capital of France is' --preset balanced --seed 0",
    )
    from compress.cli_generate import add_generate_arguments

    add_generate_arguments(gen)

    sub.add_parser(
        "list-stages", help="list the stages and their options", description="List every stage and its options."
    )

    ins = sub.add_parser(
        "inspect",
        help="summarise a run folder or an artifact folder",
        description="Print the report of a run folder, or the manifest of one artifact folder.",
    )
    ins.add_argument("path", type=Path)
    ins.add_argument(
        "--table",
        choices=("artifacts", "texts", "latency", "llm", "gates"),
        help="print only this table of a run's report (markdown, e.g. for a README)",
    )
    cmp = sub.add_parser(
        "compare",
        help="compare two runs (or two artifacts): metrics, size, latency, flips; --fail-on for CI",
        description="Compare every artifact two run folders share (or two artifact folders): metrics, size and "
        "p50 latency with deltas (B minus A) and prediction flips. Exit 0: no --fail-on threshold breached; "
        "1: one is; 2: a bad folder or --fail-on; 4: a threshold could not be checked and none is breached.",
    )
    cmp.add_argument("a", type=Path, metavar="RUN_A", help="run folder (or artifact folder) A, the reference")
    cmp.add_argument("b", type=Path, metavar="RUN_B", help="run folder (or artifact folder) B, the candidate")
    cmp.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="NAME OP NUMBER",
        help="exit 1 when a value of B against A crosses it, e.g. 'top1_drop>0.2', 'latency_rise_pct>=10', "
        "'flips_pct>1'; names: <metric>_drop, <metric>_rise, <metric>_rise_pct, size_rise_pct, "
        "latency_rise_pct, flips_pct, right_to_wrong, wrong_to_right; repeatable",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.runner = None  # set by `_run`: where a failure happened and where its traceback went
    code = _dispatch(args)
    if args.command == "run":
        from compress.follower import finish

        finish(code)  # an N-process run: every process exits with rank 0's code
    return code


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "validate":
            return _validate(args.pipeline, args.show_config)
        if args.command == "generate":
            from compress.cli_generate import generate_command

            return generate_command(args)
        if args.command == "list-stages":
            return _list_stages()
        if args.command == "inspect":
            return _inspect(args.path, args.table)
        if args.command == "compare":
            return _compare(args.a, args.b, args.fail_on)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RunLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STAGE
    except KeyboardInterrupt:
        kept = f"; finished artifacts are kept in {args.runner.run_dir}" if args.runner else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        print(_internal_error(exc, args.runner, debug=args.debug), file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_CONFIG


def _internal_error(exc: Exception, runner: Runner | None, *, debug: bool) -> str:
    """One paragraph for a bug: what failed, during what, where the traceback is (printed too with --debug)."""
    import traceback

    during = f" during {runner.step}" if runner else ""
    if runner and runner.journal.traceback_in:
        where = f"The full traceback is in {runner.journal.traceback_in}."
    else:
        where = "Run again with --debug for the full traceback."
    tb = "".join(traceback.format_exception(exc)) if debug else ""
    return (
        f"{tb}internal error{during}: {type(exc).__name__}: {exc}. {where} "
        "This is a bug in compress; please report it with the log."
    )


def _validate(pipeline: Path, show_config: bool) -> int:
    from compress.config import load_pipeline

    cfg = load_pipeline(pipeline)
    _print_warnings(cfg.warnings)
    print(f"{pipeline}: valid ({len(cfg.stages)} stages, baseline '{cfg.baseline}')")
    if show_config:
        print(json.dumps(cfg.resolved, indent=2))
    return EXIT_OK


def _print_warnings(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from compress.config import load_pipeline
    from compress.distributed import processes
    from compress.follower import follow
    from compress.progress import Reporter
    from compress.runner import Runner

    cfg = load_pipeline(args.pipeline)
    if not processes().is_main:  # rank > 0 of an N-process launch: train when rank 0 says, write nothing
        _check_force(cfg, args.force)
        return follow(cfg, args.runs_dir)
    _print_warnings(cfg.warnings)
    _check_force(cfg, args.force)
    _prepare_runs_dir(args.runs_dir)
    args.runner = runner = Runner(
        cfg,
        runs_dir=args.runs_dir,
        force=frozenset(args.force),
        reporter=Reporter(quiet=args.quiet),
        bench=not args.no_bench,
        evaluate=not args.no_eval,
        wait=args.wait,
    )
    try:
        result = runner.run()
    except OSError as exc:
        message = _disk_error(exc, runner.run_dir)
        if message is None:
            raise
        raise StageError(message) from exc
    return {"PASS": EXIT_OK, "FAIL": EXIT_GATE, "INCOMPLETE": EXIT_INCOMPLETE}[result.verdict]


#: What the runner re-measures on `--force eval` / `--force bench`, besides stage kinds and artifact names.
FORCE_MEASUREMENTS = ("eval", "bench")


def _check_force(cfg: PipelineConfig, names: list[str]) -> None:
    """`--force typo` must not be a silent full cache hit."""
    from compress.config import SOURCE

    valid = dict.fromkeys([SOURCE, *(p.name for p in cfg.stages), *(p.kind for p in cfg.stages), *FORCE_MEASUREMENTS])
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(
            f"--force {', '.join(repr(n) for n in unknown)}: not a stage or artifact of {cfg.file}; "
            f"allowed: {', '.join(valid)}"
        )


def _prepare_runs_dir(runs_dir: Path) -> None:
    """Create a missing runs dir; refuse, before any work, one that cannot be created or written."""
    if not runs_dir.exists() and not runs_dir.parent.is_dir():
        raise ConfigError(f"--runs-dir {runs_dir}: its parent folder {runs_dir.parent} does not exist; create it")
    try:
        runs_dir.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=runs_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"--runs-dir {runs_dir}: cannot write there ({exc.strerror}); choose another") from None


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _disk_error(exc: OSError, run_dir: Path) -> str | None:
    """One line for a write that the disk refused during a run; None for any other OSError."""
    path = exc.filename or f"a file under {run_dir}"
    if exc.errno in _DISK_FULL:
        what, hint = _DISK_FULL[exc.errno], "free space or use --runs-dir"
    elif exc.errno in _NOT_WRITABLE:
        what, hint = _NOT_WRITABLE[exc.errno], "make it writable or use --runs-dir"
    else:
        return None
    return f"{what} while writing {path}; {hint} (finished artifacts are intact)"


def _list_stages() -> int:
    from compress.registry import registered_stages

    for kind, spec in registered_stages().items():
        print(f"{kind}: {spec.summary}")
        options = spec.options
        variants = getattr(options, "__args__", None) or (options,)
        for cls in variants:
            cls = getattr(cls, "__origin__", cls)
            for sub in getattr(cls, "__args__", (cls,)):
                for name, field in sub.model_fields.items():
                    ann = _type_name(field.annotation)
                    default = "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
                    desc = f"  — {field.description}" if field.description else ""
                    print(f"    {name}: {ann}{default}{desc}")
        print()
    return EXIT_OK


def _type_name(annotation: object) -> str:
    """A field's type as a user writes it: Annotated unwrapped, unions and literals joined with |."""
    import types
    from typing import Annotated, Literal, Union, get_args, get_origin

    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _inspect(path: Path, table: str | None = None) -> int:
    if table is not None:
        from compress.report import markdown

        if not (path / "manifest.json").is_file():
            raise ConfigError(f"{path}: not a run folder (no manifest.json)")
        from compress.records import RunManifest

        manifest = RunManifest.from_json(json.loads((path / "manifest.json").read_text()))
        print(
            {
                "artifacts": markdown.artifacts_table,
                "texts": markdown.texts_table,
                "latency": markdown.latency_table,
                "llm": markdown.llm_table,
                "gates": markdown.gates_table,
            }[table](manifest)
        )
        return EXIT_OK
    if (path / "manifest.json").is_file():
        print(
            (path / "report.md").read_text() if (path / "report.md").is_file() else (path / "manifest.json").read_text()
        )
        return EXIT_OK
    if (path / "artifact.json").is_file():
        print((path / "artifact.json").read_text())
        return EXIT_OK
    raise ConfigError(f"{path}: neither a run folder (manifest.json) nor an artifact folder (artifact.json)")


def _compare(a: Path, b: Path, fail_on: list[str]) -> int:
    from compress.report import compare

    try:
        thresholds = [compare.Threshold.parse(t) for t in fail_on]
        side_a, side_b = compare.open_side(a), compare.open_side(b)
        rows = compare.compare_sides(side_a, side_b)
        breaches, unchecked = compare.check(rows, thresholds)
    except compare.CompareInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(compare.render(side_a, side_b, rows))
    for line in breaches:
        print(f"FAIL {line}")
    for line in unchecked:
        print(f"NOT CHECKED {line}")
    if breaches:
        return EXIT_GATE
    return EXIT_INCOMPLETE if unchecked else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
