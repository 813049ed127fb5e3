"""The runner: walk the stages with a content-hashed cache, evaluate and benchmark every artifact, check
the gates, write `manifest.json`, `report.md` and the plot.

Cache key of an artifact = sha256 over canonical JSON of {parent key, parent content digest, stage kind,
stage version, stage options, hashes of the data the stage reads}. An artifact folder whose manifest
carries the same key and whose files still have their recorded sizes and sha256 is reused ("cache hit");
anything else is rebuilt in a temporary folder and swapped in when complete, so a killed run resumes from
the last finished artifact. Chaining on the parent's content means a rebuilt parent with new bytes
rebuilds its children, a bit-identical one keeps them. Evaluations and benchmarks are cached beside their
artifact the same way (keyed by artifact key and content + evaluation data / bench settings + machine),
written atomically and checksummed. The run folder is locked for the whole run (`compress/lock.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from compress import __version__
from compress.artifact import (
    BENCH_FILE,
    EVAL_FILE,
    PREDICTIONS_FILE,
    SAMPLES_FILE,
    Artifact,
    commit_artifact,
    load_manifest,
    temp_folder,
    verify_files,
)
from compress.atomic import write_json_atomic
from compress.backends import require_onnx_providers
from compress.bench.harness import machine_info
from compress.cachefiles import load_arrays, load_predictions, read_cached, save_arrays, save_predictions, write_cached
from compress.config import SOURCE, PipelineConfig, StagePlan
from compress.distributed import processes, shards
from compress.errors import CompressError, MissingDependencyError, StageError
from compress.families.base import Adapter, Evaluation, ReportView
from compress.follower import StageOrder, lead, led_stage_done
from compress.gpu.availability import GpuUnavailableError
from compress.hashing import sha256_json
from compress.lock import run_lock
from compress.memory import PeakRss
from compress.metrics.gates import Coverage, Verdict, check_gates, verdict
from compress.paths import MANIFEST_FILE, REPORT_FILE, REPORT_HTML_FILE, RESOLVED_FILE, inside
from compress.progress import Reporter
from compress.records import ArtifactRecord, BenchRecord, Comparison, EvaluationRecord, RunManifest, as_records
from compress.registry import registered_adapters
from compress.report.html import Evidence
from compress.report.journal import RunJournal
from compress.report.markdown import verdict_title, write_report
from compress.stages.base import StageContext

SOURCE_VERSION = 2  # 2: vision torch artifacts are safetensors + architecture.json, never pickles


@dataclass
class RunResult:
    run_dir: Path
    verdict: Verdict  # PASS only when every configured gate was checked and holds
    manifest: dict[str, Any]
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def make_adapter(cfg: PipelineConfig, reporter: Reporter, cache_dir: Path) -> Adapter:
    return registered_adapters()[cfg.family](
        cfg.model, cfg.data, base_dir=cfg.base_dir, cache_dir=cache_dir, reporter=reporter
    )


class Runner:
    """Runs one validated pipeline into `runs_dir/<name>/`.

    `force`: names of stages kinds or artifacts to rebuild, or `eval` / `bench` to re-measure.
    `wait`: when another run holds the run folder's lock, wait for it instead of raising RunLockedError.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        runs_dir: Path = Path("runs"),
        force: frozenset[str] = frozenset(),
        reporter: Reporter | None = None,
        bench: bool = True,
        evaluate: bool = True,
        wait: bool = False,
    ) -> None:
        self.cfg, self.force = cfg, force
        self.reporter = reporter or Reporter()
        self.run_dir = inside(runs_dir, cfg.name)
        self.cache_dir = runs_dir / ".cache"
        self.do_bench = bench
        self.do_eval = evaluate
        self.wait = wait
        self.artifacts: dict[str, Artifact] = {}
        # manifest.json's entries (ArtifactRecord.to_json) while the run fills them in; read back as records
        self.records: dict[str, dict[str, Any]] = {}
        self.skipped: list[dict[str, str]] = []
        self.evaluations: dict[str, Evaluation] = {}  # for the report's per-sample pictures
        self.step = "preparing the run"  # what the run is doing, for the message when it fails
        self.journal = RunJournal(self.run_dir, cfg.name, cfg.file, self.reporter)

    # -- the walk ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Walk, measure, gate. A crash or Ctrl-C leaves report.md saying where it failed, never a verdict."""
        try:
            return self._walk()
        except BaseException as exc:
            self.journal.failed(exc, self.step)
            raise
        finally:
            self.journal.close()

    def _walk(self) -> RunResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir, wait=self.wait, say=self.reporter.log):
            return self._run_locked()

    def _run_locked(self) -> RunResult:
        cfg, log = self.cfg, self.reporter.log
        _remove_stale_temps(self.run_dir)
        self.journal.start()  # from here on report.md and manifest.json hold no verdict until _finish
        write_json_atomic(inside(self.run_dir, RESOLVED_FILE), cfg.resolved)
        log(f"[bold]compress run[/] {cfg.file} -> {self.run_dir}")
        require_onnx_providers(cfg.bench.onnx_providers)  # a missing GPU provider fails before any work
        self.adapter = make_adapter(cfg, self.reporter, self.cache_dir)
        t0 = time.perf_counter()
        self.data_hashes = self.adapter.data_hashes()
        hashes = ", ".join(f"{k} {v[:12]}" for k, v in self.data_hashes.items())
        log(f"data: {hashes} ({time.perf_counter() - t0:.1f} s)")

        self._source()
        for plan in cfg.stages:
            self._stage(plan)
        if self.do_eval:
            self._evaluate_all()
        if self.cfg.bench.enabled:
            self._bench_all(measure=self.do_bench)
        return self._finish()

    def _source(self) -> None:
        linked = self.adapter.links_source
        key = sha256_json(
            {
                "family": self.cfg.family,
                "source": self.adapter.source_fingerprint(),
                "version": SOURCE_VERSION,
                **({"link": True} if linked else {}),  # only when set: the keys of loaded sources stay as they were
            }
        )
        folder = inside(self.run_dir, SOURCE)
        cached = self._reusable(folder, key, forced=SOURCE in self.force)
        if cached is not None:
            self.reporter.log(f"[green]cache hit[/]  {SOURCE}")
            self._record(cached, cached=True, seconds=0.0)
            return
        start = time.perf_counter()
        self.reporter.log(f"[cyan]{'link' if linked else 'load':<11}[/]{SOURCE} ({self.cfg.model.source})")
        self.step = f"{'linking' if linked else 'loading'} the source ({self.cfg.model.source})"
        with PeakRss() as peak:
            tmp = temp_folder(folder)
            if linked:  # the weights stay in their folder; the artifact names them (Adapter.link_source)
                out = self.adapter.link_source(tmp)
                file, precision, task_ready, info, unmeasured = out.file, out.precision, True, out.info, out.unmeasured
            else:
                model, task_ready = self.adapter.load_source()
                file, precision, info, unmeasured = self.adapter.save_torch(model, tmp), "fp32", {}, None
        art = Artifact(
            name=SOURCE,
            path=folder,
            file=file,
            format="torch",
            precision=precision,
            stage=SOURCE,
            parent=None,
            key=key,
            config={"source": self.cfg.model.source},
            info=info,
            task_ready=task_ready,
            unmeasured=unmeasured,
        )
        self._record(commit_artifact(tmp, folder, art), cached=False, seconds=time.perf_counter() - start)
        self._memory(SOURCE, "stage", peak)

    def _stage(self, plan: StagePlan) -> None:
        log = self.reporter.log
        if plan.input not in self.artifacts:
            self.skipped.append(
                {"stage": plan.kind, "artifact": plan.name, "reason": f"its input '{plan.input}' was skipped"}
            )
            log(f"[yellow]skip[/]       {plan.name}: its input '{plan.input}' was skipped")
            return
        parent = self.artifacts[plan.input]
        data = {"calibration": self.data_hashes.get("calibration")}
        if plan.options.needs_train_data:
            data["train"] = self.data_hashes.get("train")
        key = sha256_json(
            {
                "parent": parent.key,
                "parent_content": parent.content_digest,
                "stage": plan.kind,
                "version": plan.spec.version,
                "options": plan.options.cache_fields(),
                "data": data,
                "extra": {
                    name: [self.artifacts[name].key, self.artifacts[name].content_digest]
                    for name in plan.options.extra_inputs()
                    if name in self.artifacts
                },
            }
        )
        folder = inside(self.run_dir, plan.name)
        cached = self._reusable(folder, key, forced=plan.name in self.force or plan.kind in self.force)
        if cached is not None:
            log(f"[green]cache hit[/]  {plan.name} ({plan.kind})")
            self._record(cached, cached=True, seconds=0.0)
            return
        log(f"[cyan]run[/]        {plan.name} ({plan.kind} from {plan.input})")
        self.step = f"stage {plan.kind} ({plan.name})"
        tmp = temp_folder(folder)
        ctx = StageContext(
            adapter=self.adapter,
            outdir=tmp,
            artifacts=dict(self.artifacts),
            baseline=self.cfg.baseline if self.cfg.baseline in self.artifacts else None,
            reporter=self.reporter,
            threads=self.cfg.threads,
            seed=self.cfg.seed,
            key=key,
        )
        if plan.options.every_process:
            ctx = self._lead(plan, ctx)
        start = time.perf_counter()
        peak = PeakRss()
        try:
            with peak:
                out = plan.spec.run(parent, plan.options, ctx)
            if plan.options.every_process:
                led_stage_done()
        except (MissingDependencyError, GpuUnavailableError) as exc:  # not installable / not on this machine
            shutil.rmtree(tmp, ignore_errors=True)
            if not plan.options.optional:
                raise StageError(f"stage {plan.kind} ({plan.name}): {exc}") from exc
            self.skipped.append({"stage": plan.kind, "artifact": plan.name, "reason": str(exc)})
            log(f"[yellow]skip[/]       {plan.name} (optional): {exc}")
            return
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        art = Artifact(
            name=plan.name,
            path=folder,
            file=out.file,
            format=out.format,
            precision=out.precision,
            stage=plan.kind,
            parent=parent.name,
            key=key,
            config=plan.options.model_dump(mode="json"),
            info={**out.info, "stage_seconds": round(seconds, 1)},
            target=out.target,
            task_ready=parent.task_ready or plan.kind == "finetune",
            unmeasured=out.unmeasured,
        )
        self._record(commit_artifact(tmp, folder, art), cached=False, seconds=seconds)
        self._memory(plan.name, "stage", peak)
        log(f"           {plan.name} done in {seconds:.1f} s, peak RSS {peak.result.peak_rss_mb:.0f} MB")

    def _lead(self, plan: StagePlan, ctx: StageContext) -> StageContext:
        """N-process launch (`compress.follower`): the other processes run this stage with us, the cores
        shared out among the processes of this machine. One process: `ctx` as it is."""
        procs = processes()
        if not procs.distributed:
            return ctx
        ctx = dataclasses.replace(ctx, threads=max(1, ctx.threads // procs.local_world))
        index = next(i for i, p in enumerate(self.cfg.stages) if p is plan)
        lead(StageOrder(index, dict(ctx.artifacts), ctx.baseline, ctx.threads, ctx.seed, ctx.key))
        how = "FSDP-sharded" if shards() else "DDP"
        self.reporter.log(f"           {plan.name}: on {procs.world} processes ({how}), {ctx.threads} thread(s) each")
        return ctx

    def _reusable(self, folder: Path, key: str, *, forced: bool) -> Artifact | None:
        """The artifact in `folder` if its key matches and its files are intact; a damaged one is named."""
        cached = load_manifest(folder)
        if forced or cached is None or cached.key != key:
            return None
        problem = verify_files(cached, self.cache_dir)
        if problem is not None:
            self.reporter.log(f"[yellow]damaged[/]    {problem}: rebuilding")
            return None
        return cached

    def _record(self, art: Artifact, *, cached: bool, seconds: float) -> None:
        self.artifacts[art.name] = art
        self.records[art.name] = ArtifactRecord.of(art, cached=cached).to_json()

    def _memory(self, name: str, part: str, peak: PeakRss) -> None:
        """Keep the peak RSS of `part` ("stage", "evaluation") of artifact `name` for manifest.json."""
        if peak.result is not None:
            self.records[name].setdefault("memory", {})[part] = peak.result.to_json()

    # -- evaluation ----------------------------------------------------------------------------------
    def _evaluate_all(self) -> None:
        for art in self.artifacts.values():
            if art.unmeasured:
                self.reporter.log(f"[yellow]skip[/]       evaluation and benchmark of {art.name}: {art.unmeasured}")
        evals = {name: self._evaluation(art) for name, art in self.artifacts.items() if _measurable(art)}
        self.evaluations = evals
        base = evals.get(self.cfg.baseline)
        for name, art in self.artifacts.items():
            ev = evals.get(name)
            if ev is None:  # an untrained head is not evaluated
                self.records[name]["evaluation"] = None
                continue
            record = EvaluationRecord(
                metrics=ev.metrics,
                vs_baseline=None if base is None or name == self.cfg.baseline else self.adapter.compare(ev, base),
                vs_parent=self.adapter.compare(ev, evals[art.parent]) if art.parent in evals else None,
            )
            self.records[name]["evaluation"] = record.to_json()

    def _evaluation(self, art: Artifact) -> Evaluation:
        """The evaluation of `art`, from its cache when that is intact, else measured and cached."""
        key = sha256_json(
            {"artifact": art.key, "content": art.content_digest, "evaluation": self.data_hashes.get("evaluation")}
        )
        ev = self._cached_evaluation(art, key) if "eval" not in self.force else None
        if ev is not None:
            self.reporter.log(f"[green]cache hit[/]  evaluation of {art.name}")
            return ev
        self.step = f"evaluation of {art.name}"
        with PeakRss() as peak:
            session = self.adapter.open_session(
                art, threads=self.cfg.threads, onnx_provider=self.cfg.bench.onnx_providers[0]
            )
            ev = self.adapter.evaluate(session, self.reporter, art.name)
            backend = session.backend
            del session  # its memory belongs to this evaluation's peak, not to the next one's start
        self._memory(art.name, "evaluation", peak)
        predictions_sha256 = save_predictions(art.path / PREDICTIONS_FILE, ev.predictions)
        samples_sha256 = save_arrays(art.path / SAMPLES_FILE, ev.samples)
        write_cached(
            art.path / EVAL_FILE,
            key,
            {
                "metrics": ev.metrics,
                "outputs": ev.outputs,
                "backend": backend,
                "predictions_sha256": predictions_sha256,
                "samples_sha256": samples_sha256,
            },
        )
        return ev

    def _cached_evaluation(self, art: Artifact, key: str) -> Evaluation | None:
        """The cached evaluation of `art`, or None (re-evaluate) when it is missing, stale or damaged."""
        hit = read_cached(art.path / EVAL_FILE, key)
        if hit is None:
            return None
        predictions = load_predictions(art.path / PREDICTIONS_FILE, hit.get("predictions_sha256"))
        if predictions is None:
            self.reporter.log(f"[yellow]damaged[/]    {art.name}/{PREDICTIONS_FILE}: re-evaluating")
            return None
        if "samples_sha256" not in hit:  # cached before per-sample arrays were kept
            self.reporter.log(f"[yellow]stale[/]      evaluation of {art.name} has no {SAMPLES_FILE}: re-evaluating")
            return None
        samples = load_arrays(art.path / SAMPLES_FILE, hit["samples_sha256"])
        if samples is None:
            self.reporter.log(f"[yellow]damaged[/]    {art.name}/{SAMPLES_FILE}: re-evaluating")
            return None
        return Evaluation(hit["metrics"], predictions, hit.get("outputs", {}), samples)

    # -- benchmarks ----------------------------------------------------------------------------------
    def _bench_all(self, measure: bool) -> None:
        """Benchmarks of every artifact; with `measure=False` (--no-bench) only cached results are used."""
        self.machine = machine_info()
        bench_cfg = self.cfg.bench.model_dump(mode="json")
        machine_key = {k: self.machine[k] for k in ("cpu", "cores", "torch", "onnxruntime")}
        for name, art in self.artifacts.items():
            if not _measurable(art):
                continue  # an untrained head is not a deliverable; a GPU-only file does not run here
            key = sha256_json(
                {"artifact": art.key, "content": art.content_digest, "bench": bench_cfg, "machine": machine_key}
            )
            cache = art.path / BENCH_FILE
            hit = read_cached(cache, key) if "bench" not in self.force else None
            if hit is not None:
                self.reporter.log(f"[green]cache hit[/]  benchmark of {name}")
                self.records[name]["bench"] = BenchRecord.from_json(hit["result"]).to_json()
                continue
            if not measure:
                continue
            self.step = f"benchmark of {name}"
            with self.reporter.task(
                f"benchmark {name} (batch {list(self.cfg.bench.batch_sizes)}, {self.cfg.bench.threads} thread(s))",
                total=None,
            ):
                result = _bench_subprocess(self.cfg, art, self.cache_dir, self.machine)
            result["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_cached(cache, key, {"result": result})
            bench = BenchRecord.from_json(result)
            self.records[name]["bench"] = bench.to_json()
            b1 = bench.latency[0]
            self.reporter.log(
                f"           {name}: p50 {b1.p50_ms:.2f} ms at batch {b1.batch_size} "
                f"({bench.backend}), peak RSS {bench.peak_rss_mb:.0f} MB"
            )

    # -- gates and outputs ---------------------------------------------------------------------------
    def _finish(self) -> RunResult:
        self.step = "checking the gates"
        coverage = Coverage(
            skipped={s["artifact"]: s["reason"] for s in self.skipped},
            evaluation_off=None if self.do_eval else "--no-eval",
            bench_off="bench.enabled: false" if not self.cfg.bench.enabled else None if self.do_bench else "--no-bench",
        )
        records = as_records(self.records)
        gates = check_gates(self.cfg, records, coverage)
        outcome = verdict(gates)
        manifest = RunManifest(
            compress_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            pipeline={"name": self.cfg.name, "file": str(self.cfg.file), "family": self.cfg.family},
            baseline=self.cfg.baseline,
            notes=tuple(self.adapter.notes()),
            metric_names=tuple(self.adapter.metric_names),
            comparisons=tuple(Comparison(*c) for c in self.adapter.comparisons),
            data=self.data_hashes,
            machine=getattr(self, "machine", None) or machine_info(),
            bench_settings=self.cfg.bench.model_dump(mode="json"),
            artifacts=tuple(records[name] for name in self.artifacts),
            skipped=tuple(self.skipped),
            gates=tuple(gates),
            verdict=outcome,
            run={"state": "finished", "step": None, "error": None},
        )
        self.step = "writing the report"  # a failure from here on leaves the verdict as it is
        problems = self._write_outputs(manifest)
        marks = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]", "not-checked": "[yellow]NOT CHECKED[/]"}
        for g in gates:
            value = "n/a" if g.value is None else f"{g.value:.3g}"
            self.reporter.log(f"{marks[g.status]} {g.gate} {g.artifact} vs {g.vs}: {value} ({g.bound}) {g.detail}")
        colour = {"PASS": "green", "FAIL": "red", "INCOMPLETE": "yellow"}[outcome]
        title = verdict_title(outcome, sum(g.status == "not-checked" for g in gates))
        report = inside(self.run_dir, REPORT_FILE)
        written = not problems.keys() & {report, inside(self.run_dir, MANIFEST_FILE)}
        where = (
            f"report: {report} and {REPORT_HTML_FILE}" if written else "report.md not written (see the warning above)"
        )
        self.reporter.log(f"[{colour}]{title}[/]; {where}")
        return RunResult(self.run_dir, outcome, manifest.to_json(), dict(self.artifacts))

    def _evidence(self) -> Evidence:
        """What report.html reads beyond the manifest. A family view that fails leaves its pictures out."""
        try:
            view = self.adapter.report_view()
        except Exception as exc:  # the report's pictures may never change a verdict
            self.reporter.log(f"[yellow]warning[/]: report.html without class names, images or cards: {exc}")
            view = ReportView()
        return Evidence(
            evaluations=dict(self.evaluations),
            view=view,
            model=self.cfg.model.model_dump(mode="json"),
            command=f"compress run {self.cfg.file}",
        )

    def _write_outputs(self, manifest: RunManifest) -> dict[Path, str]:
        """manifest.json, the plot and report.md; what failed becomes a warning, since the verdict stands."""
        path = inside(self.run_dir, MANIFEST_FILE)
        try:
            write_json_atomic(path, manifest.to_json())
            problems = write_report(manifest, self.run_dir, evidence=self._evidence())
        except OSError as exc:
            problems = {path: f"{type(exc).__name__}: {exc}"}
        for file, why in problems.items():
            self.reporter.log(f"[yellow]warning[/]: could not write {file}: {why}; the verdict below stands")
        return problems


def _measurable(art: Artifact) -> bool:
    """Evaluated and benchmarked here: a trained head, runnable on this machine's backends."""
    return art.task_ready and not art.unmeasured


def _bench_subprocess(cfg: PipelineConfig, art: Artifact, cache_dir: Path, machine: dict[str, Any]) -> dict[str, Any]:
    job = {
        "machine": machine,
        "resolved": cfg.resolved,
        "base_dir": str(cfg.base_dir.resolve()),
        "artifact": str(art.path.resolve()),
        "cache_dir": str(cache_dir.resolve()),
    }
    # The worker must import what this process imports (python:module:function sources rebuild torch artifacts).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(cfg.bench.threads),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "compress.bench.worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
    )
    if proc.returncode != 0:
        raise CompressError(f"benchmark of '{art.name}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _remove_stale_temps(run_dir: Path) -> None:
    """Leftovers of runs that died (their pid is gone) are removed; finished artifacts stay.

    `.NAME.tmp-PID` folders and files (in the run folder and in artifact folders) and `.NAME.old-PID`
    folders (the previous artifact, when a run died while `commit_artifact` swapped it out).
    """
    for pattern in (".*.tmp-*", ".*.old-*", "*/.*.tmp-*"):
        for path in list(run_dir.glob(pattern)):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
