"""`prune` and `distill` on a tiny grouped-query Llama through the runner: prune -> distill -> INT4 ONNX.

The teacher is a random tiny Llama with a sharpened final norm, so its next-token distributions carry
information a pruned student can lose and win back.
"""

from __future__ import annotations

import json
import re

import pytest
from llm_toys import tiny_pipeline
from toys import run_quietly

from compress.cli import EXIT_OK
from compress.config import load_pipeline
from compress.errors import ConfigError

pytest.importorskip("transformers")

STAGES = """
  - prune: {importance: wanda, mlp_ratio: 0.5, heads_ratio: 0.5, round_to: 16, samples: 4}
  - distill: {max_steps: 30, lr: 2.0e-3, alpha: 1.0, temperature: 1.0, batch_size: 2, checkpoint_every: 10}
  - export: {opset: 17, name: onnx-distilled, parity_samples: 4, atol: 1.0e-4}
  - quantize: {precision: int4, method: rtn, group_size: 32, name: int4, input: distill}"""


def _pipeline(tmp, stages: str, name: str = "tinyfull"):
    data = """{window: 32, evaluation_windows: 4, calibration_windows: 4, train_windows: 12, generation_tokens: 4,
       prompts: ["The for statement"]}"""
    gates = "{recovery_min: {artifact: distill, lost_by: prune, at_least: 0.5}}"
    return tiny_pipeline(tmp, name, stages, data=data, gates=gates, sharpen=4.0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm-full")
    code, manifest, records = run_quietly(_pipeline(tmp, STAGES), tmp / "runs", "--no-bench")
    return code, records, manifest, tmp / "runs" / "tinyfull"


def test_pruned_llama_keeps_gqa_shapes_and_reloads(full_run) -> None:
    code, rec, _, run_dir = full_run
    assert code == EXIT_OK
    info = rec["prune"]["artifact"]["info"]
    # tiny_llama: 4 query heads in 2 KV groups, MLP 128 wide; half of each goes, KV heads stay.
    assert info["intermediate_size"] == [128, 64]
    assert info["num_attention_heads"] == [4, 2] and info["num_key_value_heads"] == [2, 2]
    assert info["params_after"] < info["params_before"] and 0 < info["macs_reduction"] < 1
    config = json.loads((run_dir / "prune" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 2, 2)
    assert config["head_dim"] == 16  # 64 / 4, kept explicit: 64 / 2 would be wrong
    # the pruned folder reloads in transformers and evaluates (finite perplexity)
    assert 1 < rec["prune"]["evaluation"]["metrics"]["ppl"] < 1e6


def test_distill_lowers_token_kl_and_perplexity_gap(full_run) -> None:
    _, rec, manifest, _ = full_run
    info = rec["distill"]["artifact"]["info"]
    assert info["teacher"] == "source"  # the input of the prune stage
    assert info["kl_data"]["set"] == "calibration" and info["kl_data"]["tokens"] > 0, info["kl_data"]
    # 30 steps on 12 windows must at least halve the KL pruning caused (seen: 0.05 -> 0.02)
    assert info["kl_after"] < info["kl_before"] / 2, info
    # the student still evaluates (perplexity on the evaluation windows) after training in place
    assert rec["distill"]["evaluation"]["metrics"]["ppl"] > 1
    # and wins back at least half of the perplexity pruning cost (the pipeline's recovery_min gate)
    gate = next(g for g in manifest["gates"] if g["gate"] == "recovery_min")
    assert gate["passed"] and gate["value"] >= 0.5, gate


def test_distilled_llama_exports_with_kv_cache_and_quantizes(full_run) -> None:
    _, rec, _, _ = full_run
    export = rec["onnx-distilled"]["artifact"]["info"]
    assert export["parity_max_abs_diff"] < 1e-4 and export["parity_greedy_tokens_match"]
    assert rec["int4"]["artifact"]["precision"] == "int4"
    assert rec["int4"]["evaluation"]["vs_parent"]["agreement"] > 50.0


@pytest.mark.parametrize(
    ("family_stages", "key", "message"),
    [
        ("  - prune: {target: {macs: 0.4}, mlp_ratio: 0.3}", "prune.target", "applies to vision models"),
        ("  - prune: {importance: taylor, mlp_ratio: 0.3}", "prune.importance", "allowed: l1, l2, wanda"),
        ("  - prune: {importance: wanda}", "prune.mlp_ratio", "set mlp_ratio and/or heads_ratio"),
        ("  - distill: {task: classification, max_steps: 5}", "distill.task", "does not fit family 'causal-lm'"),
    ],
)
def test_options_of_the_other_family_are_located_errors(tmp_path, family_stages, key, message) -> None:
    pipeline = _pipeline(tmp_path, "\n" + family_stages, name="bad")
    line = 1 + next(i for i, text in enumerate(pipeline.read_text().splitlines()) if text == family_stages)
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert re.search(rf"bad\.yaml:{line}: stages\[0\]\.{re.escape(key)}.*{re.escape(message)}", str(err.value)), str(
        err.value
    )
