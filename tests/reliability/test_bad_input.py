"""Bad input gets a sentence, not a traceback (issue 10): each case is a one-line error naming the file
(and line), the key and what to do, with exit 2 — or a warning where a value is odd but usable.

Most cases only validate; one tiny run (2 fine-tune steps, no benchmarks) serves the cases that need a run
folder: a disk that fills up during a stage, a missing runs dir that is created, `generate` on a vision
artifact.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest
from toys import pipeline_yaml

from compress.cli import EXIT_CONFIG, EXIT_OK, EXIT_STAGE, main

STAGES = "\n  - finetune: {steps: 2, batch_size: 32}"
EXPORT = STAGES + "\n  - export: {opset: 17, parity_samples: 4}"


def _validate(path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["validate", str(path), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _pipeline(tmp: Path, fashion: Path, name: str = "bad", **kw) -> Path:
    return pipeline_yaml(tmp, fashion, name=name, stages=kw.pop("stages", STAGES), **kw)


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return path


def _one_problem(err: str, *fragments: str) -> None:
    """`err` is one error: `error: ...`, or `error: 1 problem in the pipeline file:` and that problem."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert lines[0].startswith("error: "), err
    assert len(lines) == (2 if lines[0] == "error: 1 problem in the pipeline file:" else 1), err
    for fragment in fragments:
        assert fragment in err, err


# -- the YAML itself -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, where",
    [
        ("gates:\n  top1_drop_max: 5.0", "gates:", "gates: the value is empty"),
        ("bench: {batch_sizes: [1, 4], warmup: 2, iterations: 5, threads: 1}", "bench:", "bench: the value is empty"),
        ("stages:\n  - finetune: {steps: 2, batch_size: 32}", "stages:", "stages: required, but the value is empty"),
        ("  calibration: {split: train, samples: 64}", "  calibration:", "data.calibration: the value is empty"),
    ],
)
def test_empty_value_is_a_located_error(tmp_path, fashion_mnist, capsys, old, new, where) -> None:
    path = _edit(_pipeline(tmp_path, fashion_mnist), old, new)
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    line = path.read_text().splitlines().index(new) + 1
    _one_problem(err, f"{path}:{line}: {where}")


def test_empty_stage_options_still_mean_defaults(tmp_path, fashion_mnist, capsys) -> None:
    path = _pipeline(tmp_path, fashion_mnist, stages=STAGES + "\n  - export:")
    code, out, _ = _validate(path, capsys)
    assert code == EXIT_OK, out


def test_non_utf8_file_names_the_byte(tmp_path, fashion_mnist, capsys) -> None:
    path = _pipeline(tmp_path, fashion_mnist)
    raw = path.read_bytes().replace(b"name: bad", "name: bad  # café".encode("latin-1"))
    path.write_bytes(raw)
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    at = raw.index("é".encode("latin-1"))
    _one_problem(err, f"{path}:1: not UTF-8 text at byte {at}")


def test_alias_bomb_is_refused_at_once(tmp_path, capsys) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")  # 10**9 strings once expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    assert time.perf_counter() - start < 2.0  # main took > 30 s; the cap stops it in about 0.1 s
    _one_problem(err, f"{path}:", "values once aliases are expanded")


def test_python_tags_are_refused_and_never_run(tmp_path, capsys) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "tag.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    assert not marker.exists()
    _one_problem(err, f"{path}:1:", "is not allowed")


# -- types and bounds ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"extra": "threads: yes"}, "threads = True: expected a whole number"),
        ({"extra": "seed: 1.5"}, "seed = 1.5: expected a whole number"),
        ({"stages": "\n  - finetune: {steps: 1.0e+26}"}, "stages[0].finetune.steps = 1e+26: expected a whole number"),
        ({"stages": "\n  - finetune: {steps: 100000000000000000000000000}"}, "less than or equal to 2147483647"),
        ({"gates": "top1_drop_max: .inf"}, "gates.top1_drop_max = inf: Input should be a finite number"),
        ({"extra": "threads: 100000"}, "threads = 100000: Input should be less than or equal to 1024"),
    ],
)
def test_counts_are_whole_numbers_and_bounds_finite(tmp_path, fashion_mnist, capsys, kw, fragment) -> None:
    code, _, err = _validate(_pipeline(tmp_path, fashion_mnist, **kw), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, fragment)


def test_nan_without_a_bound_is_refused(tmp_path, fashion_mnist, capsys) -> None:
    path = _edit(_pipeline(tmp_path, fashion_mnist), "  input_size: 28", "  input_size: 28\n  mean: [.nan, 0.5, 0.5]")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "model.mean[0] = nan: Input should be a finite number")


def test_zero_batch_size_is_refused(tmp_path, fashion_mnist, capsys) -> None:
    path = _edit(_pipeline(tmp_path, fashion_mnist), "batch_sizes: [1, 4]", "batch_sizes: [0]")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "bench.batch_sizes[0] = 0: Input should be greater than 0")


def test_threads_above_the_core_count_warn(tmp_path, fashion_mnist, capsys) -> None:
    many = (os.cpu_count() or 1) + 1
    path = _edit(_pipeline(tmp_path, fashion_mnist, extra=f"threads: {many}"), "threads: 1}", f"threads: {many}}}")
    code, out, err = _validate(path, capsys)
    assert code == EXIT_OK
    assert "valid" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err  # `threads` and `bench.threads`, one line each
    assert f"threads = {many} is above this machine's" in warnings[0]


# -- what a run would only have found later --------------------------------------------------------------
def test_unimportable_python_source(tmp_path, fashion_mnist, capsys) -> None:
    code, _, err = _validate(_pipeline(tmp_path, fashion_mnist, source="python:no_such_module_xyz:build"), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "model.source", "cannot import module 'no_such_module_xyz'")


def test_python_source_without_the_function(tmp_path, fashion_mnist, capsys) -> None:
    code, _, err = _validate(_pipeline(tmp_path, fashion_mnist, source="python:toys:no_such_builder"), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "model.source", "has no callable 'no_such_builder'")


def test_missing_dataset_root(tmp_path, fashion_mnist, capsys) -> None:
    path = _edit(_pipeline(tmp_path, fashion_mnist), f"root: {fashion_mnist}", f"root: {tmp_path / 'absent'}")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"{path}:9: data.root: dataset root {tmp_path / 'absent'} does not exist")


def test_dataset_root_without_its_files(tmp_path, fashion_mnist, capsys) -> None:
    (tmp_path / "empty").mkdir()
    path = _edit(_pipeline(tmp_path, fashion_mnist), f"root: {fashion_mnist}", f"root: {tmp_path / 'empty'}")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"data.root: dataset root {tmp_path / 'empty'} lacks train-images-idx3-ubyte.gz, ")


def test_unknown_split(tmp_path, fashion_mnist, capsys) -> None:
    path = _edit(_pipeline(tmp_path, fashion_mnist), "evaluation: {split: test", "evaluation: {split: tset")
    code, _, err = _validate(path, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "data.evaluation.split: 'tset': not a split of", "allowed: train, test")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("baseline: onnx", "the default teacher (the baseline, 'onnx') is onnx"),
        ("baseline: finetune-2", "the baseline 'finetune-2' comes later"),
    ],
)
def test_distill_without_a_usable_teacher(tmp_path, fashion_mnist, capsys, extra, fragment) -> None:
    stages = (
        "\n  - finetune: {steps: 2}\n  - export: {name: onnx}"
        "\n  - distill: {input: finetune, max_steps: 2}\n  - finetune: {steps: 2}"
    )
    code, _, err = _validate(_pipeline(tmp_path, fashion_mnist, stages=stages, extra=extra), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, "stages[2].distill.teacher", fragment)


# -- model files -----------------------------------------------------------------------------------------
def _with_weights(tmp: Path, fashion: Path, weights: Path) -> Path:
    return _edit(_pipeline(tmp, fashion), "  num_classes: 10", f"  num_classes: 10\n  weights: {weights}")


def _torch_weights(path: Path) -> Path:
    import torch
    from toys import tiny_cnn

    torch.save(tiny_cnn().state_dict(), path)
    return path


def test_random_bytes_as_weights(tmp_path, fashion_mnist, capsys) -> None:
    weights = tmp_path / "random.pth"
    weights.write_bytes(b"\x13\x37" * 512)
    code, _, err = _validate(_with_weights(tmp_path, fashion_mnist, weights), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"model.weights: {weights}: not a valid PyTorch weights file (starts with b'\\x137\\x137'")


def test_truncated_weights(tmp_path, fashion_mnist, capsys) -> None:
    weights = _torch_weights(tmp_path / "w.pth")
    weights.write_bytes(weights.read_bytes()[:20000])
    code, _, err = _validate(_with_weights(tmp_path, fashion_mnist, weights), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"{weights}: not a valid PyTorch weights file (a zip archive without its directory")


def test_weights_that_pass_the_header_check_fail_at_load_with_the_same_message(tmp_path, fashion_mnist) -> None:
    from compress.config import load_pipeline
    from compress.errors import ConfigError
    from compress.progress import Reporter
    from compress.runner import make_adapter

    weights = tmp_path / "w.pth"
    with zipfile.ZipFile(weights, "w") as archive:  # a whole zip archive, but not torch.save's
        archive.writestr("notes.txt", "not a model")
    cfg = load_pipeline(_with_weights(tmp_path, fashion_mnist, weights))
    with pytest.raises(ConfigError, match="not a valid PyTorch weights file"):
        make_adapter(cfg, Reporter(quiet=True), tmp_path / "cache").load_source()


def _gguf_pipeline(tmp: Path, gguf: Path, data: str = "{window: 16}") -> Path:
    path = tmp / "llm.yaml"
    model = f"{{family: causal-lm, source: 'gguf:{gguf}'}}"
    path.write_text(f"name: llm\nmodel: {model}\ndata: {data}\nstages:\n  - export:\n")
    return path


def _gguf_header(path: Path) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 2) + b"\x00" * 10)  # a header, then nothing
    return path


def test_missing_text_file_of_a_causal_lm(tmp_path, capsys) -> None:
    text = tmp_path / "absent.txt"
    pipeline = _gguf_pipeline(tmp_path, _gguf_header(tmp_path / "m.gguf"), f"{{text: {{kind: text, path: {text}}}}}")
    code, _, err = _validate(pipeline, capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"{pipeline}:3: data.text.path: '{text}': no such file")


def test_random_bytes_as_gguf(tmp_path, capsys) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    code, _, err = _validate(_gguf_pipeline(tmp_path, gguf), capsys)
    assert code == EXIT_CONFIG
    _one_problem(err, f"model.source: {gguf}: not a valid GGUF file (starts with b'PK\\x03\\x04")


def test_gguf_cut_after_its_header_fails_at_load_with_the_same_message(tmp_path, capsys) -> None:
    pytest.importorskip("gguf")
    from compress.errors import ConfigError
    from compress.families.causal_lm.model_io import convert_gguf

    gguf = _gguf_header(tmp_path / "model.gguf")
    assert _validate(_gguf_pipeline(tmp_path, gguf), capsys)[0] == EXIT_OK  # the header itself is sound
    with pytest.raises(ConfigError, match=f"{gguf}: not a valid GGUF file .*truncated"):
        convert_gguf(gguf, cache_dir=tmp_path / "cache")


# -- the command line ------------------------------------------------------------------------------------
def test_validate_prints_the_verdict_first_and_the_config_on_request(tmp_path, fashion_mnist, capsys) -> None:
    path = _pipeline(tmp_path, fashion_mnist)
    code, out, _ = _validate(path, capsys)
    assert code == EXIT_OK
    assert out == f"{path}: valid (1 stages, baseline 'finetune')\n"
    code, out, _ = _validate(path, capsys, "--show-config")
    first, _, rest = out.partition("\n")
    assert first.endswith("valid (1 stages, baseline 'finetune')")
    assert json.loads(rest)["stages"][0]["finetune"]["steps"] == 2


def test_force_with_an_unknown_name(tmp_path, fashion_mnist, capsys) -> None:
    path = _pipeline(tmp_path, fashion_mnist)
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--force", "finetun"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    _one_problem(err, "--force 'finetun': not a stage or artifact of", "allowed: source, finetune, eval, bench")
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_runs_dir_whose_parent_is_missing(tmp_path, fashion_mnist, capsys) -> None:
    runs = tmp_path / "absent" / "runs"
    code = main(["run", str(_pipeline(tmp_path, fashion_mnist)), "--runs-dir", str(runs), "--quiet"])
    assert code == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, f"--runs-dir {runs}: its parent folder {runs.parent} does not exist")
    assert not runs.parent.exists()


def test_read_only_runs_dir(tmp_path, fashion_mnist, capsys) -> None:
    runs = tmp_path / "ro"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        if os.access(runs, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes here")
        code = main(["run", str(_pipeline(tmp_path, fashion_mnist)), "--runs-dir", str(runs), "--quiet"])
    finally:
        runs.chmod(0o755)
    assert code == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, f"--runs-dir {runs}: cannot write there")


def test_runs_dir_on_a_read_only_file_system(tmp_path, fashion_mnist, capsys, monkeypatch) -> None:
    """The same refusal where permissions cannot be tested (root): the write probe meets EROFS."""
    import tempfile

    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(errno.EROFS, "Read-only file system")

    runs = tmp_path / "ro"
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code = main(["run", str(_pipeline(tmp_path, fashion_mnist)), "--runs-dir", str(runs), "--quiet"])
    assert code == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, f"--runs-dir {runs}: cannot write there (Read-only file system)")


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory, fashion_mnist) -> tuple[int, str, Path]:
    """A run into a runs dir that does not exist yet, whose export stage meets a full disk."""
    import compress.families.vision.adapter as vision

    tmp = tmp_path_factory.mktemp("full-disk")
    path = pipeline_yaml(tmp, fashion_mnist, name="full", stages=EXPORT)

    def full(self, model, onnx_path, **kw) -> None:  # noqa: ANN001
        onnx_path.write_bytes(b"\x08\x07")
        raise OSError(errno.ENOSPC, "No space left on device", str(onnx_path))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vision.VisionAdapter, "export_onnx", full)
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["run", str(path), "--runs-dir", str(tmp / "runs"), "--quiet", "--no-bench"])
    return code, err.getvalue(), tmp / "runs" / "full"


def test_full_disk_during_a_stage(full_disk_run) -> None:
    code, err, run_dir = full_disk_run
    assert code == EXIT_STAGE
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the run's progress log
    assert last.startswith("error: no space left on device while writing "), err
    assert last.endswith("model.onnx; free space or use --runs-dir (finished artifacts are intact)")
    assert (run_dir / "finetune" / "artifact.json").is_file()  # the finished artifact is intact
    assert not (run_dir / "export").exists()
    assert not list(run_dir.glob(".export.tmp-*"))  # nor a half-written one


def test_missing_runs_dir_is_created(full_disk_run) -> None:
    assert full_disk_run[2].parent.is_dir()


# -- compress generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--top-p", "2"], "--top-p = 2.0: Input should be less than or equal to 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens = -1: Input should be greater than or equal to 0"),
        (["--temperature", "0"], "--temperature = 0.0: Input should be greater than 0"),
        (["--threads", "0"], "--threads = 0: must be at least 1"),
    ],
)
def test_generate_bad_flags(tmp_path, capsys, flags, fragment) -> None:
    code = main(["generate", str(tmp_path), "hello", *flags])
    assert code == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, fragment)


def test_generate_needs_an_artifact_folder(tmp_path, capsys) -> None:
    assert main(["generate", str(tmp_path / "absent"), "hello"]) == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, "absent: no such folder")
    assert main(["generate", str(tmp_path), "hello"]) == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, "not a complete artifact folder")


def test_generate_refuses_a_vision_artifact(full_disk_run, capsys) -> None:
    assert main(["generate", str(full_disk_run[2] / "finetune"), "hello"]) == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, "a vision artifact; generate needs one of a causal-lm run")


def test_generate_refuses_a_damaged_artifact(tmp_path, capsys) -> None:
    """generate checks a run's artifact files as the runner does before reuse: a truncated model is named."""
    from llm_toys import tiny_pipeline  # tests/ is on sys.path

    data = "{window: 32, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: [def]}"
    pipeline = tiny_pipeline(tmp_path, "gen", "\n  - export: {opset: 17}", data=data)
    runs = tmp_path / "runs"
    assert main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet", "--no-eval", "--no-bench"]) == 0
    folder = runs / "gen" / "export"
    assert main(["generate", str(folder), "def", "--max-new-tokens", "2", "--threads", "1"]) == 0
    capsys.readouterr()
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])
    assert main(["generate", str(folder), "def", "--threads", "1"]) == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, f"{folder}: damaged (export/model.onnx: size")


def test_generate_on_a_corrupt_onnx_file(tmp_path, capsys) -> None:
    from llm_toys import tiny_tokenizer  # tests/ is on sys.path

    folder = tmp_path / "run" / "int8"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\x00garbage" * 64)
    tiny_tokenizer().save_pretrained(folder)
    manifest = {"name": "int8", "path": str(folder), "file": "model.onnx", "format": "onnx", "precision": "int8"}
    manifest |= {"stage": "quantize", "parent": None, "key": "0" * 64}
    (folder / "artifact.json").write_text(json.dumps(manifest))
    assert main(["generate", str(folder), "hello", "--threads", "1"]) == EXIT_CONFIG
    _one_problem(capsys.readouterr().err, f"{folder / 'model.onnx'}: not a valid ONNX file (512 bytes read")


@pytest.mark.parametrize(
    "code, start",
    [
        (errno.ENOSPC, "no space left on device while writing /r/x; free space"),
        (errno.EDQUOT, "disk quota exceeded while writing /r/x; free space"),
        (errno.EROFS, "read-only file system while writing /r/x; make it writable"),
        (errno.EACCES, "permission denied while writing /r/x; make it writable"),
        (errno.EINVAL, None),  # not the disk's refusal: left to the internal-error handler
    ],
)
def test_disk_errors_are_translated_in_one_place(code, start) -> None:
    from compress.cli import _disk_error

    message = _disk_error(OSError(code, os.strerror(code), "/r/x"), Path("/r"))
    assert (message is None) if start is None else message.startswith(start), message
