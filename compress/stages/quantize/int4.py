"""INT4 weight-only quantization on the torch side (RTN, GPTQ, AWQ, or a GPTQ checkpoint), carried into ONNX.

```yaml
- quantize: {precision: int4, method: gptq, group_size: 128, name: int4-gptq-g128}
- quantize: {precision: int4, method: {name: awq, then: gptq}, input: source, name: int4-awq-g128}
- quantize: {precision: int4, method: rtn, symmetric: true, target: tensorrt, input: source}
- quantize: {precision: int4, method: {name: checkpoint, folder: /models/smollm2-gptq}, input: source}
```

Scheme keys (`group_size`, `symmetric`, `lm_head`, `keep`) at the top; the algorithm's own keys under
`method:` (`compress.quant.algorithms`), the target's under `target:` (`compress.quant.targets`).

Flow: load the torch artifact -> quantize its Linear layers in place (`compress.quant.algorithms`; each
weight then holds its dequantized value) -> export that model with the adapter into `_fp.onnx` -> replace
every quantized Linear's MatMul/Gemm by its INT4 form (`compress.quant.targets.onnx_rewrite`, matched by
weight value) into `model.onnx` -> parity of ONNX Runtime against the dequantized torch model -> for
`target: tensorrt` the TensorRT Q/DQ rules (`compress.checks.tensorrt`).

Targets:
- `onnxruntime-cpu`: `com.microsoft.MatMulNBits` (asymmetric or symmetric, any opset >= 13; default 17).
  `accuracy_level` 4 computes with int8 activations inside the kernel (fastest on AVX512-VNNI).
- `tensorrt`: standard ONNX, opset 21: blocked signed-INT4 `DequantizeLinear` + `MatMul`. Symmetric weights
  only (TensorRT's INT4 has no zero point). The adapter exports at `target.opset` (default 20, the highest the
  TorchScript exporter supports; 21 works with `dynamo: true`); the library raises the opset import of a
  graph exported at 18..20 to 21 (no standard op used here changed meaning in 19..21) and refuses one below
  18 (ReduceMean/Split changed signature at 18). ONNX Runtime would fuse
  DQ+MatMul into MatMulNBits with int8 activations (accuracy level 4), which is not what TensorRT
  computes (FP16/FP32 activations), so the artifact records the session setting
  `session.qdq_matmulnbits_accuracy_level = 0` and the adapters' sessions apply it.

`lm_head` (the output projection, and the embedding table when tied to it, as in SmolLM2) stays float by
default: on SmolLM2-135M quantizing the tied head/embedding to 4 bits cost about 3.7 perplexity points
(14.70 baseline). `int8` / `int4` quantize it after the decoder layers: by GPTQ on its own calibration inputs
(the quantized body's final-norm outputs) when the method runs GPTQ (`gptq`, `awq` then `gptq`), else by RTN;
AWQ's scale is not applied to it (a tied table would carry the scale into the embedding). For
onnxruntime-cpu a tied table is then untied in the exported graph so the embedding Gather reads the same
8/4-bit codes (`GatherBlockQuantized`) and no float copy stays; TensorRT takes INT4 weights on MatMul/Gemm
only, so there the embedding Gather keeps a float table (holding the dequantized values).

- `onnxruntime-genai` (causal-lm): no export + rewrite; onnxruntime-genai's model builder writes its fused
  decoder graph from the quantized weights (`compress.stages.quantize.genai_target`, which says what is
  refused); `execution_provider: cpu | cuda`, `accuracy_level`. `streamed: true` (method rtn, gptq or awq)
  quantizes one decoder layer at a time from the input's safetensors without loading the model
  (`compress.quant.streamed`), and the fused graph is written one layer at a time from the builder's 2-layer
  pattern (`compress.genai.layered`); `activation_dtype: bfloat16 | float16` (streamed gptq / awq) keeps the
  hidden states between layers at half the size of float32's (every layer still computes in float32).

Families: causal-lm (calibration windows of `data`), vision and text-encoder; the adapter's
`calibration_batch_size` says how many inputs go in one calibration forward (vision 8, others 1);
only `nn.Linear` layers are quantized: convolutions stay as they are (said in the log and in `info`).
AWQ folds its scales into the op before each Linear and needs a decoder with an architecture map
(`compress.families.causal_lm.archs`).

`method: {name: checkpoint, folder: FOLDER}` reads an AutoGPTQ / GPTQModel folder (`quantize_config.json`
+ `*.safetensors` with `qweight/qzeros/scales/g_idx`) and exports exactly those codes, scales and zero points without
re-quantizing. The torch artifact supplies the architecture (e.g. the same HF folder as the checkpoint's
base model); other tensors stored in the folder (norms, embeddings, biases) replace the artifact's.
"""

from __future__ import annotations

import fnmatch
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from compress.errors import StageError
from compress.quant import algorithms, targets
from compress.quant.registry import named
from compress.quant.scheme import ActivationDtype, GroupSize
from compress.quant.vocab import LmHead
from compress.schema import Count, Real
from compress.stages.base import StageContext, StageOptions, StageOutput
from compress.stages.quantize.common import TargetField, refuse_flat_keys, torch_calibration
from compress.stages.quantize.mixed import MixedOptions
from compress.stages.quantize.mixed_budget import MixedBudget

if TYPE_CHECKING:
    from compress.families.base import Adapter

Int4Method = Annotated[
    algorithms.RtnOptions
    | algorithms.GptqOptions
    | algorithms.AwqOptions
    | algorithms.AutoRoundOptions
    | algorithms.CheckpointOptions,
    Field(discriminator="name"),
    BeforeValidator(named(algorithms.INT4, "method")),
]


class Int4Options(StageOptions):
    """INT4 weight-only quantization of a torch artifact's Linear layers, exported to ONNX.

    Scheme keys at the top (`group_size`, `symmetric`, `lm_head`, `keep`); the algorithm's own keys under
    `method: {name: ...}`, the target's under `target: {name: ...}`.
    """

    accepts: ClassVar[frozenset[str]] = frozenset({"torch"})
    precision: Literal["int4"]
    method: Int4Method = Field(
        algorithms.GptqOptions(),
        description="rtn | gptq | awq | autoround | checkpoint, or a mapping {name: ..., <its keys>}",
    )
    target: TargetField = Field(
        targets.OnnxruntimeCpu(), description="onnxruntime-cpu | tensorrt | onnxruntime-genai, or a mapping"
    )
    group_size: GroupSize = Field(128, description="input columns sharing one scale / zero point")
    symmetric: bool = Field(False, description="zero point fixed at 8; required by target tensorrt")
    lm_head: LmHead = Field(
        "float",
        description="output projection (and a tied embedding): float, or 8 / 4 bits (GPTQ when the method runs "
        "GPTQ, else RTN); 4-bit RTN cost ~3.7 perplexity on SmolLM2-135M (14.70 -> ~18.4 on top of the body's loss)",
    )
    keep: tuple[str, ...] = Field(
        (), description="module-name globs kept at float, e.g. 'model.layers.0.*' (their bytes are reported)"
    )
    streamed: bool = Field(
        False,
        description="quantize one decoder layer at a time from the input's safetensors, never loading the float "
        "model, and write the ONNX graph layer by layer (models larger than memory; method rtn, gptq or awq, "
        "target onnxruntime-genai; resumes per layer)",
    )
    activation_dtype: ActivationDtype = Field(
        "float32",
        description="streamed gptq / awq: dtype of the hidden states kept between layers (in memory and on disk); "
        "bfloat16 / float16 halve them, every layer still computes in float32 (the codes move slightly)",
    )
    mixed: MixedOptions | None = Field(
        None,
        description="{max_mb, windows, group_size}: MatMulNBits units to 8 bits by sensitivity per MB within max_mb "
        "(target onnxruntime-genai, lm_head int4; compress/stages/quantize/mixed.py)",
    )
    accuracy_budget: MixedBudget | None = Field(
        None,
        description="{max_rise, windows, start, sigmas}, beside mixed: the fewest units to 8 bits (by gain per MB) "
        "that hold the perplexity rise on held-apart calibration windows (compress/stages/quantize/mixed_budget.py)",
    )
    parity_samples: Count = Field(8, gt=0, description="decode steps (causal-lm) / inputs (vision) of the parity check")
    parity_atol: Real | None = Field(
        None,
        gt=0,
        description="fail the stage if max |onnx - dequantized torch| logit exceeds this; default: report only",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        return refuse_flat_keys(data, cls.model_fields, algorithms.INT4)

    def output_format(self, input_format: str) -> str:
        return "onnx"

    def output_precision(self, input_precision: str) -> str:
        return "int4"

    def check_family(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        """The family declares the INT4 algorithms its models can take (AWQ needs a decoder's layer map)."""
        problems, allowed = [], adapter.int4_methods
        if self.method.name not in allowed:
            problems.append(
                ("method", f"not available for family '{adapter.family}'; allowed: {', '.join(sorted(allowed))}")
            )
        if self.target.name not in adapter.int4_targets:
            allowed = ", ".join(sorted(adapter.int4_targets))
            problems.append(("target", f"{self.target.name}: not for family '{adapter.family}'; allowed: {allowed}"))
        return problems

    def check_plan(self, earlier: dict[str, str]) -> list[tuple[str, str]]:
        """Combinations no single field can refuse: the target's INT4 rules, method-specific keys."""
        problems: list[tuple[str, str]] = []
        target, checkpoint = self.target, self.method.name == "checkpoint"
        if target.symmetric_int4 and not self.symmetric and not checkpoint:
            problems.append(
                (
                    "symmetric",
                    f"target {target.name} needs symmetric INT4 (no INT4 zero point); "
                    "set symmetric: true or target: onnxruntime-cpu",
                )
            )
        if target.tensorrt_rules and target.export_opset < 18:
            problems.append(("target", "target tensorrt needs opset >= 18 (raised to 21); default 20"))
        if not target.contrib_ops and self.lm_head == "int8":
            problems.append(("lm_head", f"target {target.name} carries 4-bit weights only; allowed: float, int4"))
        if target.dynamo and target.export_opset < 18:
            problems.append(("target", "dynamo: true needs opset >= 18"))
        if checkpoint and self.keep:
            problems.append(("keep", "method checkpoint exports the folder's layers as they are; remove keep"))
        if target.fused_decoder:
            from compress.stages.quantize.genai_target import refusals

            problems += refusals(self)
        if self.streamed:
            from compress.stages.quantize.genai_target import streamed_refusals

            problems += streamed_refusals(self)
        elif self.activation_dtype != "float32":
            problems.append(("activation_dtype", "for streamed: true only (the in-memory path keeps float32)"))
        if self.mixed:
            from compress.stages.quantize.mixed import refusals as mixed_refusals

            problems += mixed_refusals(self)
        from compress.stages.quantize.mixed_budget import refusals as budget_refusals

        problems += budget_refusals(self)
        return problems

    @property
    def streams_weights(self) -> bool:
        return self.streamed

    def cache_fields(self) -> dict[str, Any]:
        fields = super().cache_fields()
        if not self.streamed:  # added later: the keys of artifacts made before it stay as they were
            fields.pop("streamed")
        if self.activation_dtype == "float32":  # likewise
            fields.pop("activation_dtype")
        if self.mixed is None:  # likewise
            fields.pop("mixed")
        if self.accuracy_budget is None:  # likewise
            fields.pop("accuracy_budget")
        if head_quantizer(self) == "gptq" and not (self.target.fused_decoder and self.lm_head == "int8"):
            fields["lm_head_quantizer"] = "gptq"  # was RTN: artifacts with a GPTQ head get new keys
        if isinstance(self.method, algorithms.CheckpointOptions):
            from compress.hashing import file_fingerprint

            folder = Path(self.method.folder).expanduser()
            files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json"))
            fields["checkpoint_files"] = [file_fingerprint(f) for f in files]
        if self.target.fused_decoder:
            from compress.genai.rewrite import GRAPH_REWRITE
            from compress.stages.quantize.genai_target import genai_version

            fields["onnxruntime_genai"] = genai_version()  # its builder writes the graph
            fields["genai_rewrite"] = GRAPH_REWRITE  # and our fixes of it
        return fields


def quantize_int4(artifact, options: Int4Options, ctx: StageContext) -> StageOutput:
    """Quantize the torch model's Linears, then write the target's file: export + INT4 rewrite + parity
    (and TensorRT rules), or onnxruntime-genai's builder (`genai_target`)."""
    import torch

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    if options.streamed:  # the float model is never loaded
        from compress.stages.quantize.genai_target import build_streamed_artifact

        return build_streamed_artifact(artifact, options, ctx)
    model = ctx.adapter.load_torch(artifact)
    convs = sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    if convs:
        ctx.reporter.log(f"  only Linear layers are quantized: {convs} convolution(s) stay as they are")
    fused = options.target.fused_decoder
    if fused:
        from compress.stages.quantize.genai_target import build_genai_artifact, refuse_architecture

        refuse_architecture(model)
    if options.mixed:
        from compress.stages.quantize.mixed import quantize_mixed

        return quantize_mixed(artifact, model, options, ctx)
    start = time.perf_counter()
    qws, loaded, unscaled = _quantize(model, options, ctx)
    # the builder's own RTN makes an 8-bit head (our 4-bit tensors go through pack_gptq, 4 bits only)
    head = None if fused and options.lm_head == "int8" else _quantize_head(model, options, qws, ctx)
    info = {**_scheme_info(options, qws, loaded), "quantize_seconds": round(time.perf_counter() - start, 1)}
    if isinstance(options.method, algorithms.AwqOptions):
        info["awq_groups_unscaled"] = unscaled
    if convs:
        info["convolutions_untouched"] = convs
    if fused:
        return build_genai_artifact(model, qws, options, ctx, {**info, "layers_quantized": len(qws)})
    return _rewritten_artifact(artifact, model, qws, head, options, ctx, info)


def _rewritten_artifact(
    artifact, model: Any, qws: dict[str, Any], head: str | None, options: Int4Options, ctx: StageContext, info: dict
) -> StageOutput:
    """Export + INT4 rewrite into `model.onnx`, parity against the dequantized torch model, TensorRT rules."""
    kept = _kept_linears(model, options)
    kept_bytes = sum(m.weight.numel() * m.weight.element_size() for m in kept.values())
    if options.keep:
        ctx.reporter.log(f"  kept at float by `keep`: {len(kept)} Linear(s), {kept_bytes / 1e6:.2f} MB")
    out = ctx.outdir / "model.onnx"
    report, embeddings = _export_rewrite(model, qws, head, out, options, ctx)
    target = options.target
    parity = dequantized_parity(model, out, options, ctx)
    info = {**info, **_rewrite_info(options, qws, report, out)}
    info.update(embedding_quantized=sorted(embeddings), layers_kept=sorted(kept), kept_float_bytes=kept_bytes, **parity)
    if target.tensorrt_rules:
        from compress.checks.tensorrt import assert_tensorrt_ready

        assert_tensorrt_ready(str(out), source=f"quantize int4 → {artifact.name}")
        info["tensorrt_rules"] = "passed"
        ctx.reporter.log("  TensorRT Q/DQ rules: passed")
    return StageOutput(file="model.onnx", format="onnx", precision="int4", info=info, target=target.name)


def _export_rewrite(
    model: Any, qws: dict[str, Any], head: str | None, out: Path, options: Int4Options, ctx: StageContext
) -> tuple[Any, dict[str, str]]:
    """Export the dequantized model, then rewrite its quantized MatMuls in the target's INT4 form at `out`.

    Returns (RewriteReport, {embedding module: head module} untied for a quantized gather)."""
    from compress.quant.targets.onnx_rewrite import float_weights_of, rewrite_onnx_file
    from compress.stages.export import export_to

    target = options.target
    fp = ctx.outdir / "_fp" / "model.onnx"
    with ctx.reporter.task(f"export + INT4 rewrite ({target.name}, opset {target.export_opset})", total=None):
        # TensorRT's INT4 is for MatMul/Gemm weights only: a tied table stays one float initializer there
        embeddings = _untie_for_export(model, head) if head and target.contrib_ops else {}
        fp.parent.mkdir()
        export_to(ctx.adapter, model, fp, opset=target.export_opset, dynamo=target.dynamo)
        report = rewrite_onnx_file(
            fp,
            out,
            qws,
            float_weights_of(model, list(qws) + list(embeddings)),
            target=target.rewrite,
            accuracy_level=getattr(target, "accuracy_level", None),
            embeddings={name: qws[src] for name, src in embeddings.items()},
        )
        shutil.rmtree(fp.parent)
    ctx.reporter.log(f"  INT4 rewrite: {report.summary()}")
    return report, embeddings


def _rewrite_info(options: Int4Options, qws: dict[str, Any], report: Any, out: Path) -> dict[str, Any]:
    """What the export + INT4 rewrite did, and the session the parity check used."""
    from compress.stages.quantize.common import op_counts, quantized_nodes

    target = options.target
    session_config = target.int4_session_config()
    info: dict[str, Any] = {
        "opset": report.opset_raised_to or target.export_opset,
        "layers_quantized": len([n for n in report.replaced if n in qws]),
        "quantized_nodes": quantized_nodes(op_counts(out)),
        "rewrite": report.summary(),
        "size_before_bytes": report.size_before,
        "size_after_bytes": report.size_after,
        "parity_session": "onnxruntime defaults (tensorrt target: DQ+MatMul fused, int8 activations)"
        if session_config
        else f"MatMulNBits accuracy level {getattr(target, 'accuracy_level', 0)}",
    }
    if session_config:
        info["ort_session_config"] = session_config
    if hasattr(target, "accuracy_level"):
        info["accuracy_level"] = target.accuracy_level
    return info


def _scheme_info(options: Int4Options, qws: dict[str, Any], loaded: str | None) -> dict[str, Any]:
    """Algorithm, scheme and target as resolved (a checkpoint's own group size / symmetry)."""
    first = next(iter(qws.values()))
    info: dict[str, Any] = {
        **options.method.model_dump(mode="json", exclude={"name"}),
        "method": options.method.name,
        "group_size": first.group_size if loaded else options.group_size,
        "symmetric": first.symmetric if loaded else options.symmetric,
        "target": options.target.name,
        "lm_head": options.lm_head,
        "lm_head_quantizer": head_quantizer(options),
    }
    if "samples" in info:
        info["calibration_samples"] = info.pop("samples")
    if loaded:
        info["checkpoint"] = info.pop("folder")
    return info


# -- quantization -------------------------------------------------------------------------------------------
def _keep_filter(options: Int4Options):  # -> LinearFilter
    def keep(name: str, module: Any) -> bool:
        if name.endswith("lm_head"):
            return False  # handled by _quantize_head
        return not any(fnmatch.fnmatchcase(name, g) for g in options.keep)

    return keep


def _kept_linears(model: Any, options: Int4Options) -> dict[str, Any]:
    import torch

    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatchcase(n, g) for g in options.keep)
    }


def method_config(options: Int4Options, ctx: StageContext) -> Any:  # -> WeightQuantConfig (or a subclass)
    """The algorithm config of `options.method` (RTN, AutoRound, GPTQ or AWQ): one mapping for the in-memory path
    (`_quantize`) and the streamed one (`genai_target.build_streamed_artifact`)."""
    from compress.quant.algorithms.autoround import AutoRoundConfig
    from compress.quant.algorithms.awq import AWQConfig
    from compress.quant.algorithms.gptq import GPTQConfig
    from compress.quant.primitives.weight import WeightQuantConfig

    method = options.method
    base = {"group_size": options.group_size, "symmetric": options.symmetric}
    if isinstance(method, algorithms.AutoRoundOptions):
        return AutoRoundConfig(**base, iters=method.iters, lr=method.lr, amp=method.amp, seed=ctx.seed)
    if isinstance(method, algorithms.GptqOptions):
        return GPTQConfig(**base, act_order=method.act_order, percdamp=method.damp)
    if isinstance(method, algorithms.AwqOptions):
        return AWQConfig(**base, quantizer=method.then, seed=ctx.seed)
    return WeightQuantConfig(**base)


def _quantize(
    model: Any, options: Int4Options, ctx: StageContext, on_float: Any = None
) -> tuple[dict[str, Any], str | None, list[str]]:
    """Quantize the selected Linears in place (AWQ tells ``on_float(name, weight)`` each scaled float weight).

    Returns ({name: QuantizedWeight}, checkpoint folder or None, AWQ scale groups left unscaled).
    """
    from compress.families.causal_lm.archs import find_arch
    from compress.quant.algorithms.autoround import autoround_quantize_model
    from compress.quant.algorithms.awq import awq_quantize_model
    from compress.quant.algorithms.gptq import gptq_quantize_model
    from compress.quant.algorithms.rtn import rtn_quantize_model

    method = options.method
    if isinstance(method, algorithms.CheckpointOptions):
        return _load_checkpoint(model, method.folder, options.target, ctx), method.folder, []
    keep = _keep_filter(options)
    cfg = method_config(options, ctx)
    arch = find_arch(model)
    total = len(model.get_submodule(arch.layers)) if arch is not None and method.name != "rtn" else 1
    skipped: list[str] = []
    label = method.name + (f"+{method.then}" if isinstance(method, algorithms.AwqOptions) else "")
    with ctx.reporter.task(f"quantize int4 {label} g{options.group_size}", total=total) as task:

        def progress(done: int, of: int, message: str) -> None:
            task.advance(1, info=message)

        if isinstance(method, algorithms.RtnOptions):
            qws = rtn_quantize_model(model, layers_filter=keep, config=cfg)
            task.advance(1)
        elif isinstance(method, algorithms.AutoRoundOptions):
            qws = autoround_quantize_model(
                model,
                ctx.adapter.tokenizer,
                torch_calibration(ctx, method.samples, "quantize int4"),
                layers_filter=keep,
                config=cfg,
            )
            task.advance(total)
        elif isinstance(method, algorithms.GptqOptions):
            qws = gptq_quantize_model(
                model,
                torch_calibration(ctx, method.samples, "quantize int4"),
                layers_filter=keep,
                config=cfg,
                progress=progress,
            )
        else:
            qws = awq_quantize_model(
                model,
                torch_calibration(ctx, method.samples, "quantize int4"),
                layers_filter=keep,
                config=cfg,
                progress=progress,
                on_skip=skipped.append,
                on_float=on_float,
            )
    if not qws:
        raise StageError("quantize int4: no Linear layer was selected (check `keep`)")
    for message in skipped:
        ctx.reporter.log(f"  AWQ scale group left unscaled: {message}")
    return qws, None, skipped


def _load_checkpoint(model: Any, checkpoint: str, target: targets.TargetOptions, ctx: StageContext) -> dict[str, Any]:
    """Read a GPTQ folder; its quantized Linears get their dequantized weights, other tensors are copied."""
    import torch

    from compress.quant.algorithms.checkpoint import read_gptq_checkpoint

    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise StageError(f"quantize int4: method.folder = {checkpoint}: no such folder")
    try:
        qws, cfg = read_gptq_checkpoint(folder)
    except ValueError as exc:  # the folder is not a GPTQ checkpoint this reader takes
        raise StageError(f"quantize int4: method.folder: {exc}") from None
    if target.symmetric_int4 and not cfg.sym:
        raise StageError(f"{folder}: an asymmetric GPTQ checkpoint (sym: false) cannot target {target.name}")
    if target.symmetric_int4 and not all(qw.has_trivial_g_idx() for qw in qws.values()):
        raise StageError(
            f"{folder}: an act-order GPTQ checkpoint (desc_act without static groups) cannot target {target.name}; "
            "use target: onnxruntime-cpu"
        )
    modules = dict(model.named_modules())
    for name, qw in qws.items():
        mod = modules.get(name)
        if not isinstance(mod, torch.nn.Linear) or tuple(mod.weight.shape) != qw.shape:
            got = tuple(mod.weight.shape) if isinstance(mod, torch.nn.Linear) else type(mod).__name__
            raise StageError(
                f"{folder}: {name} {qw.shape} does not match the model's module ({got}); the torch input must "
                "be the checkpoint's base model"
            )
    from safetensors.numpy import load_file

    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for f in sorted(folder.glob("*.safetensors")):
            for key, value in load_file(str(f)).items():
                if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    continue
                if key in state and tuple(state[key].shape) == value.shape:
                    state[key].copy_(torch.from_numpy(value))
                    copied += 1
        for name, qw in qws.items():
            modules[name].weight.copy_(qw.dequantize(modules[name].weight.dtype))
    ctx.reporter.log(
        f"  GPTQ checkpoint {folder}: {len(qws)} quantized Linear(s) (g{cfg.group_size}, "
        f"{'sym' if cfg.sym else 'asym'}, {cfg.checkpoint_format}), {copied} other tensor(s) copied"
    )
    return qws


def head_quantizer(options: Int4Options) -> str | None:
    """How the output projection is quantized: None (float), "gptq" when the method runs GPTQ (gptq, awq then
    gptq: on the head's calibration inputs), else "rtn" (rtn, awq then rtn, a checkpoint: no head in it; and
    `streamed: true`, whose head is quantized in row blocks by RTN, `compress.quant.streamed`)."""
    if options.lm_head == "float":
        return None
    method = options.method
    gptq = not options.streamed and (
        isinstance(method, algorithms.GptqOptions) or getattr(method, "then", None) == "gptq"
    )
    return "gptq" if gptq else "rtn"


def _quantize_head(model: Any, options: Int4Options, qws: dict[str, Any], ctx: StageContext) -> str | None:
    """Quantize the output projection at 8/4 bits when asked (`head_quantizer`); returns its module name.

    Runs after the decoder layers, so GPTQ sees the head's inputs from the quantized body."""
    how = head_quantizer(options)
    if how is None:
        return None
    import torch

    from compress.quant.algorithms.rtn import rtn_quantize
    from compress.quant.primitives.weight import WeightQuantConfig

    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        raise StageError(f"lm_head = {options.lm_head}: this model has no output projection; use lm_head: float")
    name = next(n for n, m in model.named_modules() if m is head)
    base = {
        "bits": 8 if options.lm_head == "int8" else 4,
        "group_size": options.group_size,
        "symmetric": options.symmetric,
    }
    if how == "gptq":
        from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_head

        method = options.method
        own = {"act_order": method.act_order, "percdamp": method.damp} if method.name == "gptq" else {}  # awq: its GPTQ
        with ctx.reporter.task(f"GPTQ {name} ({base['bits']} bit g{options.group_size})", total=None):
            qws[name] = gptq_quantize_head(
                model, torch_calibration(ctx, method.samples, "quantize int4"), name, GPTQConfig(**base, **own)
            )
        return name
    qw = rtn_quantize(head.weight, WeightQuantConfig(**base))
    with torch.no_grad():
        head.weight.copy_(qw.dequantize(head.weight.dtype))  # a tied embedding shares these values
    qws[name] = qw
    return name


def _untie_for_export(model: Any, head: str) -> dict[str, str]:
    """Give a tied embedding its own (equal) parameter so the exported Gather can be quantized too.

    The decoder export stores a tied table once, read by a Gather along axis 1 that the INT4 rewrite cannot
    turn into a quantized gather; untied, the Gather reads an `(V, H)` table of its own. Returns
    {embedding module name: head module name} for `rewrite_onnx_file(embeddings=...)`.
    """
    import torch

    emb = model.get_input_embeddings()
    modules = dict(model.named_modules())
    if emb is None or emb.weight is not modules[head].weight:
        return {}
    modules[head].weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return {next(n for n, m in model.named_modules() if m is emb): head}


def dequantized_parity(model: Any, out: Path, options: Int4Options, ctx: StageContext) -> dict[str, Any]:
    """ONNX Runtime on `out` against the dequantized torch model; fails only when `parity_atol` is set."""
    parity = ctx.adapter.check_export(
        model,
        out,
        samples=options.parity_samples,
        atol=options.parity_atol if options.parity_atol is not None else float("inf"),
        rtol=0.0,
        threads=ctx.threads,
        raise_on_failure=options.parity_atol is not None,
    )
    ctx.reporter.log(f"  parity: max |onnx - dequantized torch| logit = {parity['parity_max_abs_diff']:.3g}")
    return parity
