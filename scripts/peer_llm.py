"""The SmolLM2-135M peer table: our artifacts beside onnxruntime-genai's model builder and llama.cpp, one run.

    flock /tmp/compress-heavy.lock scripts/install_peers.sh              # once: the `peers` extra (llama.cpp, no AMX)
    compress run pipelines/smollm2-int4-genai.yaml                        # our artifacts (also smollm2-int4 / -int8)
    flock /tmp/compress-heavy.lock .venv/bin/python scripts/peer_llm.py   # then this (~15-25 min on 2 cores)

Needs: the runs' folders under `--runs-dir` (any of smollm2-int4-genai, smollm2-int4, smollm2-int8 that exist;
their files are checked against their manifests before use), onnxruntime-genai (the `llm` extra),
llama-cpp-python and llama.cpp's converter (`scripts/install_peers.sh`: the `peers` extra, never a test
dependency). A missing peer tool is a clear error; `--peers` picks the peer rows.

Every row is measured here, in this process, on the same machine state (nothing is copied from a manifest):
- perplexity on the project's 8 x 512 pydoc evaluation windows, the same token ids for every system, through
  `compress.families.causal_lm.task.perplexity` (llama.cpp: the same ids evaluated with `logits_all`);
- prefill of 512 tokens from an empty cache at 1 thread, and decode tokens/s (128 greedy tokens after a
  5-token prompt, batch 1) at 1 and 2 threads, through `compress.bench.decoder.bench_decoder` (the same
  seeded random prompts for every system; a genai folder through onnxruntime-genai's Generator, the `engine`
  column; llama.cpp through the small `LlamaCppDecoder` adapter below);
- file MB: the weights file(s) a deployer ships (model.onnx + its .data; the .gguf).

The peers, built from the FP32 Hugging Face folder of the SmolLM2 source (SmolLM2-135M-Instruct was published
at 4 bits, Q4_1: its "FP32" is that model dequantised, the same folder our pipelines start from):
- onnxruntime-genai's model builder with its defaults, `-p fp32` and `-p int4 -e cpu` (run as its command line);
- ONNX Runtime's own INT4 weight-only quantizer, opt-in (`--peers ort-rtn-g32 ...`): `MatMulNBitsQuantizer`
  with its default (RTN, asymmetric) or HQQ algorithm at block 128 / 32 on our `onnx-fp32` export of a run,
  every MatMul with a constant weight (the lm_head included) at 4 bits, accuracy level 4 written into every
  MatMulNBits node as in our artifacts (so both sides use the same kernel);
- llama.cpp: llama.cpp's `convert_hf_to_gguf.py --outtype f32`, then its own quantizer
  (`llama_cpp.llama_model_quantize`) for Q8_0 / Q4_0 / Q4_K_M. llama.cpp prefill asks for the last position's
  logits only (its default), as do our genai graphs built with `prune_lm_head` (the target's default; their
  perplexity is then read token by token, `OrtCausalLM`); the builder's own graphs (its defaults) and our own
  exports compute logits at every position.
Peer files go to `<runs-dir>/peers/` with a `peer.json` of their sha256s, checked before a file is reused.
The table is printed as markdown and written to `<runs-dir>/peers/peer_llm.md` (figures in `peer_llm.json`).
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

RUNS = ("smollm2-int4-genai", "smollm2-int4", "smollm2-int8")
PEERS = ("genai-fp32", "genai-int4", "llama-f32", "llama-q8_0", "llama-q4_0", "llama-q4_k_m")
# ONNX Runtime's own MatMulNBitsQuantizer on our FP32 ONNX export (opt-in: HQQ's graph decodes at ~3 tok/s here)
ORT_PEERS = ("ort-rtn-g128", "ort-rtn-g32", "ort-hqq-g128", "ort-hqq-g32")
LLAMA_FTYPES = {"llama-q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "llama-q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                "llama-q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # fmt: skip
PREFILL, PROMPT, DECODE = 512, 5, 128


# -- llama.cpp as a decoder session ------------------------------------------------------------------------
class LlamaCppDecoder:
    """A GGUF file in llama.cpp (llama-cpp-python) behind `compress.backends.DecoderSession`, batch 1.

    Written here because llama.cpp is only a peer: no stage of compress produces GGUF. `logits` evaluates a
    window on an empty cache with every position's logits (`logits_all=True`); `prefill`/`decode` keep
    llama.cpp's default of the last position only, read with `llama_get_logits_ith(ctx, -1)`.
    """

    backend = "llama.cpp"

    def __init__(self, path: Path, *, threads: int, logits_all: bool, n_ctx: int = 1024) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=PREFILL,
            n_ubatch=PREFILL,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())

    def _check(self, ids: np.ndarray) -> list[int]:
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"LlamaCppDecoder runs batch 1; got input_ids of shape {ids.shape}")
        return [int(t) for t in ids[0]]

    def _last(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()[None, None]  # (1, 1, V)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        rows = []
        for row in np.asarray(input_ids):
            self.llm.reset()
            self.llm.eval([int(t) for t in row])
            rows.append(np.array(self.llm.scores[: len(row)], dtype=np.float32))  # (T, V)
        return np.stack(rows)  # (B, T, V)

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, int]:
        if not last_only:
            return self.logits(input_ids), self.llm.n_tokens
        self.llm.reset()
        self.llm.eval(self._check(np.asarray(input_ids)))
        return self._last(), self.llm.n_tokens

    def decode(self, input_ids: np.ndarray, state: int) -> tuple[np.ndarray, int]:
        if state != self.llm.n_tokens:
            raise RuntimeError(f"llama.cpp cache holds {self.llm.n_tokens} tokens, the caller's state {state}")
        self.llm.eval(self._check(np.asarray(input_ids)))
        return self._last(), self.llm.n_tokens


# -- rows ----------------------------------------------------------------------------------------------------
@dataclass
class System:
    """One row to measure: an ONNX decoder file (ours or onnxruntime-genai's) or a GGUF file."""

    system: str
    method: str
    path: Path  # model.onnx or .gguf
    kind: str  # "onnx" or "gguf"
    session_config: dict[str, str] | None = None

    @property
    def file_mb(self) -> float:
        from compress.bench.decoder import file_bytes

        return file_bytes(self.path) / 1e6


def our_systems(runs_dir: Path, runs: Sequence[str], only: Sequence[str], cache: Path, log: Any) -> list[System]:
    """The ONNX artifacts of the runs that exist, each verified against its manifest (size + sha256)."""
    from compress.artifact import Artifact, verify_files
    from compress.backends import ort_session_config

    out = []
    for run in runs:
        manifest_path = runs_dir / run / "manifest.json"
        if not manifest_path.is_file():
            log(f"  {run}: no {manifest_path}; its rows are left out (run `compress run pipelines/{run}.yaml`)")
            continue
        manifest = json.loads(manifest_path.read_text())
        for rec in manifest["artifacts"]:
            art = Artifact.from_json(rec["artifact"])
            if art.format != "onnx" or art.unmeasured or (only and not any(fnmatch.fnmatch(art.name, p) for p in only)):
                continue
            problem = verify_files(art, cache)
            if problem:
                raise SystemExit(f"{run}/{art.name}: {problem}; rerun the pipeline before measuring it")
            out.append(
                System(f"compress {run}/{art.name}", _our_method(art), art.main, "onnx", ort_session_config(art))
            )
    return out


def _our_method(art: Any) -> str:
    cfg, info = art.config or {}, art.info or {}
    if art.precision == "fp32":
        return "our ONNX export, fp32"
    method = cfg.get("method")
    name = method.get("name") if isinstance(method, dict) else method
    if name in (None, "", "auto"):  # the stage records what `auto` resolved to
        name = info.get("method", name)
    if name == "awq":
        name = f"awq+{method.get('then') if isinstance(method, dict) else info.get('then')}"
    bits = {"int4": "4 bit", "int8": "8 bit"}.get(art.precision, art.precision)
    group = f" g{cfg['group_size']}" if cfg.get("group_size") else ""
    head = f", lm_head {cfg['lm_head']}" if cfg.get("lm_head") else ""
    target = cfg.get("target")
    target = target.get("name") if isinstance(target, dict) else target
    graph = "genai fused graph" if target == "onnxruntime-genai" else "our graph"
    return f"{name or 'rtn'} {bits}{group}{head}; {graph}".strip()


# -- peers: built once, reused only when their sha256s match ----------------------------------------------
def _digest_files(folder: Path) -> dict[str, str]:
    from compress.hashing import sha256_file

    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "peer.json"
    }


def _reuse(folder: Path, key: dict[str, Any]) -> bool:
    stamp = folder / "peer.json"
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    return recorded.get("key") == key and recorded.get("files") == _digest_files(folder)


def _commit(tmp: Path, folder: Path, key: dict[str, Any]) -> None:
    (tmp / "peer.json").write_text(json.dumps({"key": key, "files": _digest_files(tmp)}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _fresh(folder: Path) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def ort_peer(fp32: Path, out: Path, peer: str, log: Any) -> Path:
    """ONNX Runtime's MatMulNBitsQuantizer with its defaults for the algorithm, accuracy level 4 on every node."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    algorithm, block = peer.split("-")[1], int(peer.split("-g")[1])
    key = {"tool": f"onnxruntime {onnxruntime.__version__}", "peer": peer, "source": _digest_files(fp32.parent)}
    if not _reuse(out, key):
        tmp = _fresh(out)
        log(f"  ONNX Runtime MatMulNBitsQuantizer {algorithm} block {block} on {fp32}")
        config = (
            DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=4)
            if algorithm == "rtn"
            else HQQWeightOnlyQuantConfig(block_size=block, bits=4)
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config)
        quantizer.process()
        model = quantizer.model.model
        for node in model.graph.node:  # HQQ's config takes no accuracy level: set it alike on every node
            if node.op_type == "MatMulNBits":
                attrs = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", 4)])
        onnx.save_model(model, str(tmp / "model.onnx"))
        _commit(tmp, out, key)
    return out / "model.onnx"


def genai_peer(hf: Path, out: Path, precision: str, log: Any) -> Path:
    """onnxruntime-genai's model builder with its defaults (`-p fp32` / `-p int4 -e cpu`), as its CLI runs."""
    import onnxruntime_genai

    key = {"tool": f"onnxruntime-genai {onnxruntime_genai.__version__}", "precision": precision, "source": str(hf)}
    if not _reuse(out, key):
        tmp = _fresh(out)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp / "model"),
               "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]  # fmt: skip
        log(f"  building {out.name}: {' '.join(cmd[1:])}")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        _commit(tmp, out, key)
    return out / "model" / "model.onnx"


def gguf_f32(hf: Path, out: Path, src: Path, log: Any) -> Path:
    """The FP32 weights as GGUF, written by llama.cpp's own converter (`convert_hf_to_gguf.py --outtype f32`)."""
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script}: missing; run scripts/install_peers.sh (it copies llama.cpp's converter there)")
    key = {"tool": str(script), "outtype": "f32", "source": str(hf)}
    if not _reuse(out, key):
        tmp = _fresh(out)
        cmd = [sys.executable, str(script), str(hf), "--outfile", str(tmp / "model-f32.gguf"), "--outtype", "f32"]
        log(f"  converting to GGUF: {' '.join(cmd[1:])}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"{script.name} failed ({done.returncode}): {done.stderr[-800:]}")
        _commit(tmp, out, key)
    return out / "model-f32.gguf"


def gguf_quantized(f32: Path, out: Path, peer: str, log: Any) -> Path:
    """llama.cpp's own quantizer on the FP32 GGUF (`llama_model_quantize`, default parameters but the type)."""
    import llama_cpp

    ftype = LLAMA_FTYPES[peer]
    key = {"tool": f"llama-cpp-python {llama_cpp.__version__}", "ftype": ftype, "source": _digest_files(f32.parent)}
    name = f"model-{peer.removeprefix('llama-')}.gguf"
    if not _reuse(out, key):
        tmp = _fresh(out)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = 2
        log(f"  llama.cpp quantize {ftype}")
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp / name).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize({f32}, {ftype}) returned {rc}")
        _commit(tmp, out, key)
    return out / name


def peer_systems(
    peers: Sequence[str], hf: Path, peers_dir: Path, src: Path, fp32_onnx: Path | None, log: Any
) -> list[System]:
    """The peers' files, built (or verified and reused); a peer whose tool fails is logged and left out."""
    systems = []
    for peer in peers:
        try:
            systems.append(_peer_system(peer, hf, peers_dir, src, fp32_onnx, log))
        except (SystemExit, subprocess.CalledProcessError, OSError, RuntimeError, ValueError) as e:
            log(f"  {peer}: not built, left out of the table: {e}")
    return systems


def _peer_system(peer: str, hf: Path, peers_dir: Path, src: Path, fp32_onnx: Path | None, log: Any) -> System:
    if peer.startswith("ort-"):
        if fp32_onnx is None:
            raise SystemExit(f"--peers {peer}: needs the onnx-fp32 of a run among our rows (see --runs, --only)")
        path = ort_peer(fp32_onnx, peers_dir / peer, peer, log)
        name = "RTN (default, asymmetric)" if "-rtn-" in peer else "HQQ"
        method = f"MatMulNBitsQuantizer {name}, block {peer.split('-g')[1]}, lm_head int4"
        return System(f"ONNX Runtime quantizer {peer}", method, path, "onnx")
    if peer.startswith("genai-"):
        import onnxruntime_genai

        precision = peer.removeprefix("genai-")
        path = genai_peer(hf, peers_dir / peer, precision, log)
        flags = "-p fp32" if precision == "fp32" else "-p int4 -e cpu"
        version = onnxruntime_genai.__version__
        return System(f"onnxruntime-genai {version} builder `{flags}`", "builder defaults", path, "onnx")
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama_cpp is not installed: run scripts/install_peers.sh (the `peers` extra)") from None
    f32 = gguf_f32(hf, peers_dir / "llama-f32", src, log)
    path = f32 if peer == "llama-f32" else gguf_quantized(f32, peers_dir / peer, peer, log)
    kind = peer.removeprefix("llama-").upper()
    method = "convert_hf_to_gguf --outtype f32" if peer == "llama-f32" else "llama_model_quantize"
    return System(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {kind}", method, path, "gguf")


# -- measuring -----------------------------------------------------------------------------------------------
def open_session(s: System, threads: int, *, logits_all: bool = False) -> Any:
    """The system's session; for timing (not `logits_all`) a genai folder runs through its Generator."""
    if s.kind == "gguf":
        return LlamaCppDecoder(s.path, threads=threads, logits_all=logits_all)
    from compress.families.causal_lm.genai_engine import GeneratorBench, is_genai_folder
    from compress.families.causal_lm.sessions import OrtCausalLM

    if not logits_all and is_genai_folder(s.path.parent):  # the deployable engine of a genai artifact
        return GeneratorBench(s.path.parent, threads=threads)
    return OrtCausalLM(s.path, threads=threads, session_config=s.session_config)


def measure(s: System, windows: np.ndarray, args: argparse.Namespace, reporter: Any) -> dict:
    """Perplexity (at `--eval-threads`), then prefill and decode at 1 and 2 threads, each on a fresh session."""
    from compress.bench.decoder import bench_decoder, file_bytes
    from compress.families.causal_lm.task import perplexity

    row: dict[str, Any] = {"system": s.system, "method": s.method, "path": str(s.path), "file_mb": s.file_mb}
    with reporter.task(f"perplexity {s.system}", total=len(windows)) as task:
        session = open_session(s, args.eval_threads, logits_all=True)
        result = perplexity(session.logits, windows, advance=lambda n, ppl: task.advance(n, info=f"ppl {ppl:.2f}"))
        row["ppl"] = result.perplexity
        del session
    for threads in (1, 2):
        with reporter.task(f"benchmark {s.system} at {threads} thread(s)", total=None):
            session = open_session(s, threads)
            vocab = int(getattr(session, "vocab_size", 0) or session.info["vocab_size"])
            res = bench_decoder(
                session,
                vocab_size=vocab,
                weight_bytes=0,  # the memory-bandwidth bound is not part of this table
                size_bytes=file_bytes(s.path),
                threads=threads,
                prompt_lengths=(PREFILL,),
                batch_sizes=(1,),
                decode_context=PROMPT,
                decode_tokens=DECODE,
                warmup=args.warmup,
                iterations=args.iterations,
                bandwidth_gbs=1.0,  # with weight_bytes=0: no bound computed, no bandwidth measured
            )
            row[f"prefill_ms_{threads}"] = res.prefill_ms[PREFILL]
            row[f"decode_tps_{threads}"] = res.decode_tokens_per_s[1]
            row["engine"] = res.engine
            del session
    row["scaling"] = row["decode_tps_2"] / row["decode_tps_1"]
    reporter.log(
        f"  {s.system}: ppl {row['ppl']:.2f}, {row['file_mb']:.1f} MB, prefill {row['prefill_ms_1']:.0f} ms, "
        f"decode {row['decode_tps_1']:.1f} / {row['decode_tps_2']:.1f} tok/s"
    )
    return row


def table(rows: list[dict]) -> str:
    head = ["system", "method", "engine", "file MB", "ppl", "prefill 512 ms 1 thr", "decode tok/s 1 thr", "2 thr",
            "1→2"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["system"], r["method"], r.get("engine", ""), f"{r['file_mb']:.1f}", f"{r['ppl']:.2f}",
                 f"{r['prefill_ms_1']:.0f}", f"{r['decode_tps_1']:.1f}", f"{r['decode_tps_2']:.1f}",
                 f"{r['scaling']:.2f}×"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="pipeline runs whose ONNX artifacts are rows")
    parser.add_argument("--only", nargs="*", default=[], help="artifact name patterns of ours to keep (fnmatch)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS + ORT_PEERS)
    parser.add_argument("--pipeline", default="pipelines/smollm2-int4-genai.yaml", help="where the data come from")
    parser.add_argument("--llama-cpp-src", type=Path, default=None, help="llama.cpp converter (install_peers.sh)")
    parser.add_argument("--eval-threads", type=int, default=2, help="threads for perplexity (not a timing)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--iterations", type=int, default=7, help="prefill repeats (median); decode: max(1, n//2) x 128"
    )
    args = parser.parse_args(argv)

    from compress.bench.harness import machine_info
    from compress.config import load_pipeline
    from compress.families.causal_lm.model_io import convert_gguf, gguf_weight_types
    from compress.progress import Reporter
    from compress.runner import make_adapter
    from compress.sources import local_target, parse_source

    started = time.perf_counter()
    reporter = Reporter()
    cfg = load_pipeline(args.pipeline)
    cache = args.runs_dir / ".cache"
    adapter = make_adapter(cfg, reporter, cache)
    windows = adapter.windows["evaluation"]
    evaluation_hash = adapter.data_hashes()["evaluation"]
    scheme, rest = local_target(*parse_source(cfg.model.source))
    hf = convert_gguf(Path(rest), cache_dir=cache / "models") if scheme == "gguf" else Path(rest)
    reporter.log(f"evaluation windows {windows.shape} from {args.pipeline}; FP32 Hugging Face folder {hf}")
    for run in args.runs:
        manifest = args.runs_dir / run / "manifest.json"
        recorded = json.loads(manifest.read_text()).get("data", {}).get("evaluation") if manifest.is_file() else None
        if recorded is not None and recorded != evaluation_hash:
            raise SystemExit(f"{manifest}: evaluated on other windows ({recorded[:12]} != {evaluation_hash[:12]})")

    src = args.llama_cpp_src
    if src is None and any(p.startswith("llama-") for p in args.peers):
        try:
            import llama_cpp
        except ImportError:
            raise SystemExit("llama_cpp is not installed: run scripts/install_peers.sh (the `peers` extra)") from None
        src = Path(sys.prefix) / "src" / f"llama.cpp-{llama_cpp.__version__}"
    peers_dir = args.runs_dir / "peers"
    systems = our_systems(args.runs_dir, args.runs, args.only, cache, reporter.log)
    fp32_onnx = next((s.path for s in systems if s.system.endswith("/onnx-fp32")), None)
    systems += peer_systems(args.peers, hf, peers_dir, src or Path("."), fp32_onnx, reporter.log)
    reporter.log(f"{len(systems)} systems to measure: " + ", ".join(s.system for s in systems))
    if not systems:
        raise SystemExit("nothing to measure: no run of --runs exists and --peers is empty")
    peers_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    weights = gguf_weight_types(cfg.model.source)
    published = f" (published as GGUF {', '.join(weights)}: its FP32 is that model dequantised)" if weights else ""
    rows: list[dict] = []
    for s in systems:  # the table is rewritten after every row: a stopped run keeps what it measured
        rows.append(measure(s, windows, args, reporter))
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (
            f"{cfg.model.source}{published}; {when}, {machine.get('cpu', platform.processor())}, "
            f"{machine.get('cores')} cores, {' '.join(map(str, machine.get('cpu_flags', [])))}; "
            f"`scripts/peer_llm.py`, {len(rows)} of {len(systems)} rows in {time.perf_counter() - started:.0f} s. "
            f"ppl: {len(windows)} x {windows.shape[1]} windows of {args.pipeline}'s data (same ids for all); "
            f"prefill {PREFILL} tokens from an empty cache, 1 thread; decode {DECODE} greedy tokens after a "
            f"{PROMPT}-token prompt, batch 1."
        )
        text = header + "\n\n" + table(rows) + "\n"
        (peers_dir / "peer_llm.md").write_text(text)
        (peers_dir / "peer_llm.json").write_text(
            json.dumps({"header": header, "machine": machine, "rows": rows}, indent=1)
        )
    print("\n" + text)
    reporter.log(f"written: {peers_dir / 'peer_llm.md'}, {peers_dir / 'peer_llm.json'}")


if __name__ == "__main__":
    main()
