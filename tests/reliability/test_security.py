"""Issue 10, security: a pipeline file or a run folder must never touch, or run, what it does not own.

Artifact names stay inside the run folder; torch artifacts and distill checkpoints are never unpickled;
`auto_map` code runs only when the pipeline opts in; YAML tags that build Python objects are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from toys import pipeline_yaml, run_quietly, tiny_cnn

from compress.cli import EXIT_CONFIG, EXIT_OK, main
from compress.errors import ConfigError, StageError
from compress.paths import inside
from compress.prune.serialize import ARCH_FILE, MODULE_FILE, load_module, save_module

TINY = """
  - finetune: {steps: 2, lr: 1.0e-2, batch_size: 32}"""


def _sentinel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("precious")
    return folder


def _untouched(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["keep.txt"] and (folder / "keep.txt").read_text() == "precious"


class _Payload:
    """Unpickling it writes `marker`: what a model.pt planted in a run folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.write_text, (self.marker, "unpickled"))


def _plant_pickle(path: Path, marker: Path) -> None:
    """A `torch.save` file whose loading with `weights_only=False` (main's loader) writes `marker`."""
    torch.save(_Payload(marker), path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload must work, or the tests below prove nothing"
    marker.unlink()


# -- artifact names --------------------------------------------------------------------------------------
BAD_NAMES = [
    "ABS",  # replaced by an absolute path to the sentinel
    "../../../../victim",  # from <tmp>/a/b/runs/toy up to the sentinel <tmp>/victim
    ".",
    "..",
    "a/b",
    "",
    ".hidden",
    "_private",
    "manifest.json",
    "Report.MD",
    "report.html",
    "pipeline.resolved.json",
    "run.log",
    "accuracy_vs_latency.png",
    "source",
]


@pytest.mark.parametrize(
    ("key", "bad"), [(k, b) for k in ("name", "input") for b in BAD_NAMES if (k, b) != ("input", "source")]
)
def test_bad_artifact_name_is_refused_and_touches_nothing(tmp_path, fashion_mnist, capsys, key, bad) -> None:
    victim = _sentinel(tmp_path / "victim")
    value = str(victim) if bad == "ABS" else bad
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    stages = f"""
  - finetune: {{steps: 2, lr: 1.0e-2, batch_size: 32, {key}: {json.dumps(value)}}}"""
    pipeline = pipeline_yaml(work, fashion_mnist, stages=stages, gates="{}")
    runs = work / "runs"
    previous = _sentinel(runs / "toy")  # a previous run's folder must survive as it is

    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"stages[0].finetune.{key} = {value!r}" in err and ("allowed" in err or "reserved" in err), err
    assert main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet", "--no-bench"]) == EXIT_CONFIG
    assert f"stages[0].finetune.{key}" in capsys.readouterr().err
    assert _untouched(victim) and _untouched(previous)
    assert sorted(p.name for p in runs.iterdir()) == ["toy"]


def test_inside_refuses_dotdot_absolute_and_symlinked_escapes(tmp_path) -> None:
    root, outside = tmp_path / "runs" / "toy", _sentinel(tmp_path / "victim")
    root.mkdir(parents=True)
    assert inside(root, "int8") == root / "int8"
    (root / "ok-link").symlink_to(root / "int8")  # a link that stays inside is harmless
    assert inside(root, "ok-link") == root / "ok-link"
    (root / "evil").symlink_to(outside, target_is_directory=True)
    for name in ("..", "../victim", str(outside), ".", "", "evil", "evil/keep.txt"):
        with pytest.raises(ConfigError, match="outside the folder"):
            inside(root, name)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_mnist) -> tuple[Path, Path]:
    """A tiny finished run (source + finetune, no benchmarks): (pipeline, runs dir)."""
    tmp = tmp_path_factory.mktemp("security-run")
    pipeline = pipeline_yaml(tmp, fashion_mnist, stages=TINY, gates="{}")
    code, _, records = run_quietly(pipeline, tmp / "runs", "--no-bench")
    assert code == EXIT_OK and set(records) == {"source", "finetune"}
    return pipeline, tmp / "runs"


def test_symlinked_artifact_folder_is_refused_and_its_target_kept(finished_run, tmp_path, capsys) -> None:
    pipeline, runs = finished_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy, symlinks=True)
    victim = _sentinel(tmp_path / "victim")
    shutil.rmtree(copy / "toy" / "finetune")
    (copy / "toy" / "finetune").symlink_to(victim, target_is_directory=True)
    assert main(["run", str(pipeline), "--runs-dir", str(copy), "--quiet", "--no-bench"]) == EXIT_CONFIG
    assert "outside the folder" in capsys.readouterr().err
    assert _untouched(victim)


# -- pickles ---------------------------------------------------------------------------------------------
def _plant_everywhere(
    run: Path, marker: Path, *, record: bool, names: tuple[str, ...] = ("source", "finetune")
) -> None:
    """A pickle payload as `model.pt` in each artifact of `names`, named as its main file; with `record`, also
    entered in the manifest's file list with its true size and sha256, so the integrity check passes."""
    from compress.artifact import record_files

    for folder in (run / name for name in names):
        assert (folder / MODULE_FILE).is_file() and (folder / ARCH_FILE).is_file()
        _plant_pickle(folder / "model.pt", marker)
        manifest = json.loads((folder / "artifact.json").read_text())
        files = record_files(folder) if record else manifest["files"]
        (folder / "artifact.json").write_text(json.dumps({**manifest, "file": "model.pt", "files": files}))


def test_planted_model_pt_is_refused_by_the_integrity_check(finished_run, tmp_path) -> None:
    """First line of defence: a file that was not there at commit makes the artifact a rebuild, not a load."""
    pipeline, runs = finished_run
    copy, marker = tmp_path / "runs", tmp_path / "MARKER"
    shutil.copytree(runs, copy)
    _plant_everywhere(copy / "toy", marker, record=False)
    code, _, records = run_quietly(pipeline, copy, "--no-bench", "--force", "eval")
    assert code == EXIT_OK and not marker.exists()
    assert not records["finetune"]["cached"] and not (copy / "toy" / "finetune" / "model.pt").exists()


def test_planted_model_pt_is_never_unpickled(finished_run, tmp_path) -> None:
    """Second line: even a payload the manifest records (integrity check passed) is never read: torch
    artifacts load from model.safetensors + architecture.json only."""
    pipeline, runs = finished_run
    copy, marker = tmp_path / "runs", tmp_path / "MARKER"
    shutil.copytree(runs, copy)
    _plant_everywhere(copy / "toy", marker, record=True, names=("finetune",))
    code, _, records = run_quietly(pipeline, copy, "--no-bench", "--force", "eval")  # loads finetune
    assert code == EXIT_OK and not marker.exists()
    assert records["finetune"]["cached"] and records["finetune"]["evaluation"]["metrics"]["top1"] > 0
    _plant_everywhere(copy / "toy", marker, record=True, names=("source",))
    code, _, records = run_quietly(pipeline, copy, "--no-bench")  # source's new content: finetune loads it
    assert code == EXIT_OK and not marker.exists()
    assert records["source"]["cached"] and not records["finetune"]["cached"]


def test_artifact_with_only_a_pickle_fails_without_unpickling(finished_run, tmp_path, capsys) -> None:
    """An artifact of an older compress (model.pt alone, recorded as its file) is not loaded: a clear stage
    error, no marker."""
    from compress.artifact import record_files

    pipeline, runs = finished_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    folder, marker = copy / "toy" / "finetune", tmp_path / "MARKER"
    (folder / MODULE_FILE).unlink()
    (folder / ARCH_FILE).unlink()
    _plant_pickle(folder / "model.pt", marker)
    manifest = json.loads((folder / "artifact.json").read_text())
    (folder / "artifact.json").write_text(json.dumps({**manifest, "file": "model.pt", "files": record_files(folder)}))
    assert main(["run", str(pipeline), "--runs-dir", str(copy), "--quiet", "--no-bench", "--force", "eval"]) == 3
    assert "is never loaded" in capsys.readouterr().err and not marker.exists()


def test_source_of_the_pickle_era_is_rebuilt_not_loaded(finished_run, tmp_path) -> None:
    """SOURCE_VERSION changed with the format: a source cached by an older compress (model.pt) is rebuilt."""
    from compress.config import load_pipeline
    from compress.hashing import sha256_json
    from compress.progress import Reporter
    from compress.runner import SOURCE_VERSION, make_adapter

    pipeline, runs = finished_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    cfg = load_pipeline(pipeline)
    fingerprint = make_adapter(cfg, Reporter(quiet=True), copy / ".cache").source_fingerprint()
    assert SOURCE_VERSION > 1
    folder, marker = copy / "toy" / "source", tmp_path / "MARKER"
    (folder / MODULE_FILE).unlink()
    (folder / ARCH_FILE).unlink()
    _plant_pickle(folder / "model.pt", marker)
    old = json.loads((folder / "artifact.json").read_text())
    old_key = sha256_json({"family": cfg.family, "source": fingerprint, "version": 1})
    (folder / "artifact.json").write_text(json.dumps({**old, "file": "model.pt", "key": old_key}))
    code, _, records = run_quietly(pipeline, copy, "--no-bench", "--force", "finetune")
    assert code == EXIT_OK and not records["source"]["cached"] and not marker.exists()
    assert (folder / MODULE_FILE).is_file() and not (folder / "model.pt").exists()


def test_planted_distill_checkpoint_pickle_is_ignored(tmp_path) -> None:
    from compress.distill.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    marker = tmp_path / "MARKER"
    _plant_pickle(tmp_path / "distill-checkpoint.pt", marker)  # the old name
    assert load_checkpoint(tmp_path) is None and not marker.exists()
    state = {"step": 3, "opt": {"state": {0: {"m": torch.ones(2)}}, "betas": (0.9, 0.99)}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path, state)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes()[:2] != b"\x80\x04"  # not a pickle stream
    back = load_checkpoint(tmp_path)
    assert back["step"] == 3 and back["opt"]["betas"] == (0.9, 0.99) and torch.equal(back["rng"], state["rng"])
    assert torch.equal(back["opt"]["state"][0]["m"], torch.ones(2))


# -- module round trip -----------------------------------------------------------------------------------
def _pruned(model: nn.Module, x: torch.Tensor, **target: float) -> nn.Module:
    from compress.prune import PruneOptions, prune_vision

    prune_vision(model, x, PruneOptions(target=target, importance="l2", round_to=1))
    return model.eval()


def _round_trip(model: nn.Module, build, folder: Path) -> nn.Module:
    save_module(model, folder)
    return load_module(folder, build).eval()


def test_pruned_tiny_models_round_trip_exactly(tmp_path) -> None:
    from prune.prune_toys import DepthwiseResidualNet, tiny_net

    x = torch.randn(2, 3, 28, 28)
    cases = [
        ("tiny_cnn", _pruned(tiny_cnn(), x, channels=0.5), tiny_cnn),
        ("residual", _pruned(tiny_net(), x, channels=0.5), DepthwiseResidualNet),
    ]
    for label, model, build in cases:
        again = _round_trip(model, build, tmp_path / label)
        assert torch.equal(again(x), model(x)), label  # same tensors, same kernels: bit-exact
        assert again.state_dict().keys() == model.state_dict().keys()


def test_pruned_builtin_mobilenet_v2_round_trips(tmp_path) -> None:
    from compress.families.vision.models.mobilenet_v2 import mobilenet_v2

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = _pruned(mobilenet_v2().eval(), x, channels=0.3)
    again = _round_trip(model, mobilenet_v2, tmp_path / "mbv2")
    assert (again(x) - model(x)).abs().max() <= 1e-6  # same weights; 1e-6 leaves room for kernel choice


class _TiedBuffered(nn.Module):
    """A non-persistent buffer (not in the state dict: it comes from the constructor) and tied Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((8,), 0.5), persistent=False)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x) * self.scale))


def test_non_persistent_buffers_and_tied_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = _TiedBuffered().eval()
    with torch.no_grad():
        model.a.weight.mul_(3.0)
    again = _round_trip(model, _TiedBuffered, tmp_path / "tied")
    x = torch.randn(4, 8)
    assert torch.equal(again(x), model(x))
    assert again.b.weight is again.a.weight, "tied weights stay one Parameter (training updates both)"
    assert torch.equal(again.scale, torch.full((8,), 0.5))


class _Widths(nn.Module):
    """Layer types besides Conv/BatchNorm whose widths pruning changes and the architecture file records."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.prelu = nn.PReLU(8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.gn(self.conv(x))).mean(dim=(2, 3))  # (B, C)
        return self.head(self.ln(self.fc(x)))


def test_widths_of_every_recorded_type_round_trip(tmp_path) -> None:
    import torch_pruning as tp

    torch.manual_seed(0)
    model = _Widths().eval()
    tp.prune_conv_out_channels(model.conv, [0, 1])
    tp.prune_groupnorm_out_channels(model.gn, [0, 1])
    tp.prune_prelu_out_channels(model.prelu, [0, 1])
    tp.prune_linear_in_channels(model.fc, [0, 1])
    tp.prune_linear_out_channels(model.fc, [3, 4, 5])
    tp.prune_layernorm_out_channels(model.ln, [3, 4, 5])
    tp.prune_linear_in_channels(model.head, [3, 4, 5])
    x = torch.randn(2, 3, 8, 8)
    again = _round_trip(model, _Widths, tmp_path / "widths")
    assert torch.equal(again(x), model(x))
    assert (again.conv.out_channels, again.gn.num_channels, again.ln.normalized_shape) == (6, 6, (9,))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_resized_module_the_file_cannot_describe_is_refused(tmp_path) -> None:
    model = _Scaled()
    model.gain = nn.Parameter(torch.ones(5))  # what torch-pruning does to a bare Parameter
    save_module(model, tmp_path)
    with pytest.raises(StageError, match=r"module '' \(.*_Scaled\).*cannot be rebuilt"):
        load_module(tmp_path, _Scaled)


def test_architecture_file_names_no_code(tmp_path) -> None:
    """Types are compared with what the pipeline's source builds, never imported: a planted type fails."""
    save_module(tiny_cnn(), tmp_path)
    arch = json.loads((tmp_path / ARCH_FILE).read_text())
    arch["modules"][1]["type"] = "os.system"
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(StageError, match="module 'stem' is os.system, the model source builds"):
        load_module(tmp_path, tiny_cnn)


# -- trust_remote_code -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def remote_code_folder(tmp_path_factory) -> Path:
    """A tiny Llama folder whose config.json names code (auto_map) that writes a marker when imported."""
    from llm_toys import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("remote-code") / "model"
    tiny_llama(tie=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(folder.parent / 'MARKER')!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilModel\n"
    )
    return folder


def _llm_pipeline(tmp: Path, folder: Path, trust: bool) -> Path:
    path = tmp / "rc.yaml"
    path.write_text(f"""name: rc
model: {{family: causal-lm, source: "hf:{folder}", trust_remote_code: {str(trust).lower()}}}
data: {{window: 16, evaluation_windows: 2, calibration_windows: 2}}
stages:
  - export: {{opset: 17}}
""")
    return path


def test_auto_map_folder_is_refused_unless_the_pipeline_opts_in(remote_code_folder, tmp_path, capsys) -> None:
    from compress.config import load_pipeline
    from compress.families.causal_lm.model_io import load_causal_lm

    marker = remote_code_folder.parent / "MARKER"
    assert main(["validate", str(_llm_pipeline(tmp_path, remote_code_folder, trust=False))]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.trust_remote_code" in err and "auto_map" in err and "evil.EvilModel" in err, err
    with pytest.raises(ConfigError, match="trust_remote_code: true"):
        load_causal_lm(f"hf:{remote_code_folder}", cache_dir=tmp_path, trust_remote_code=False)
    assert not marker.exists()
    assert load_pipeline(_llm_pipeline(tmp_path, remote_code_folder, trust=True)).model.trust_remote_code


# -- YAML tags -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        '!!python/object:collections.OrderedDict {{family: vision, source: "python:toys:tiny_cnn"}}',
        "!custom {{family: vision}}",
    ],
)
def test_yaml_python_tags_are_refused_with_file_and_line(tmp_path, capsys, model) -> None:
    marker = tmp_path / "MARKER"
    pipeline = tmp_path / "tags.yaml"
    pipeline.write_text(f"name: toy\nmodel: {model.format(marker=marker)}\ndata: {{}}\nstages:\n  - finetune: {{}}\n")
    for argv in (["validate", str(pipeline)], ["run", str(pipeline), "--runs-dir", str(tmp_path / "runs")]):
        assert main(argv) == EXIT_CONFIG
        err = capsys.readouterr().err
        located = f"{pipeline}: line 2:" in err or f"{pipeline}:2:" in err
        assert located and ("python/" in err or "!custom" in err), err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_unreadable_tensor_file_is_a_stage_error(tmp_path) -> None:
    save_module(tiny_cnn(), tmp_path)
    (tmp_path / MODULE_FILE).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(StageError, match="not a readable tensor file"):
        load_module(tmp_path, tiny_cnn)
