"""ViT structured pruning: whole heads (torch-pruning's head pruning) and MLP width, on tiny ViTs built here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from prune_toys import TwoConvNet
from torch import nn
from toys import pipeline_yaml, run_quietly

from compress.errors import StageError
from compress.families.vision.models.vit import VisionTransformer
from compress.prune import PruneOptions, load_module, prune_vision, save_module
from compress.prune.vision import count_macs

# image 32, patch 8 -> 16 patches + the class token; 2 blocks, width 48, 4 heads of 12, MLP 96
SIZE, PATCH, DEPTH, DIM, HEADS, MLP, CLASSES = 32, 8, 2, 48, 4, 96, 10


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(SIZE, PATCH, DEPTH, DIM, HEADS, MLP, CLASSES).eval()


def _image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def hand_macs(vit: VisionTransformer) -> int:
    """Conv/Linear MACs of one image from the layer widths alone (what count_macs must agree with)."""
    tokens = (SIZE // PATCH) ** 2 + 1
    macs = (SIZE // PATCH) ** 2 * DIM * 3 * PATCH * PATCH  # patch embedding
    for block in vit.encoder.layers:
        inner = block.self_attention.heads * block.self_attention.head_dim
        hidden = block.mlp[0].out_features
        macs += tokens * (DIM * 3 * inner + inner * DIM + 2 * DIM * hidden)  # qkv, out_proj, MLP pair
    return macs + DIM * CLASSES  # the class token through the head


def test_hand_count_is_count_macs_on_the_unpruned_vit() -> None:
    vit = tiny_vit()
    # 16 x 48 x 3 x 64 (patches) + 2 x 17 x (48 x 144 + 48 x 48 + 2 x 48 x 96) (blocks) + 48 x 10 (head)
    assert count_macs(vit, _image()) == hand_macs(vit) == 774_624


def test_whole_heads_are_removed_and_the_rest_computes_what_it_did() -> None:
    """Pruned = the original with the removed heads' out_proj columns zeroed, so nothing else moved."""
    vit, x = tiny_vit(), _image()
    pruned = copy.deepcopy(vit)
    options = PruneOptions(target={"channels": 0.5}, heads_ratio=0.5, ignored_layers=["*mlp.0"], round_to=1)
    prune_vision(pruned, x, options)
    for block, before in zip(pruned.encoder.layers, vit.encoder.layers, strict=True):
        attention, original = block.self_attention, before.self_attention
        assert (attention.heads, attention.head_dim) == (2, 12)
        q_rows = original.qkv.weight[:DIM].view(HEADS, 12, DIM)  # (nh, hs, D)
        kept = [
            h
            for h in range(HEADS)
            if any(torch.equal(q_rows[h], r) for r in attention.qkv.weight[:24].view(2, 12, DIM))
        ]
        assert len(kept) == 2
        removed = [h for h in range(HEADS) if h not in kept]
        with torch.no_grad():
            for h in removed:
                original.out_proj.weight[:, h * 12 : (h + 1) * 12] = 0
        assert block.mlp[0].out_features == MLP, "MLP width kept (ignored_layers)"
    assert pruned.conv_proj.out_channels == DIM and pruned.class_token.shape == (1, 1, DIM), "residual pinned"
    with torch.no_grad():
        # 1e-5: the same sums in another order (fewer heads reshaped)
        torch.testing.assert_close(pruned(x), vit(x), atol=1e-5, rtol=0)


def test_a_macs_target_is_reached_by_heads_and_mlp_and_the_count_is_the_hand_count() -> None:
    vit, x = tiny_vit(), _image()
    report = prune_vision(vit, x, PruneOptions(target={"macs": 0.4}, heads_ratio=0.25, steps=20, round_to=1))
    assert [b.self_attention.heads for b in vit.encoder.layers] == [3, 3]
    assert report.macs_before == 774_624 and report.macs_after == hand_macs(vit) == count_macs(vit, x)
    # one step of 20 removes 0.9 / 20 of each MLP's 96 channels (~4), about 3% of the MACs
    assert 0.4 <= report.macs_reduction < 0.45
    assert vit(x).shape == (1, CLASSES)


def test_a_pruned_vit_reloads_bit_exact_and_exports_with_parity(tmp_path: Path) -> None:
    import onnxruntime as ort

    vit, x = tiny_vit(), _image()
    prune_vision(vit, x, PruneOptions(target={"channels": 0.5}, heads_ratio=0.5, round_to=4))
    save_module(vit, tmp_path / "pruned")
    again = load_module(tmp_path / "pruned", tiny_vit).eval()
    state, reloaded = vit.state_dict(), again.state_dict()
    assert list(state) == list(reloaded) and all(torch.equal(state[k], reloaded[k]) for k in state)
    assert [b.self_attention.heads for b in again.encoder.layers] == [2, 2]
    batch = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(again(batch), vit(batch))
        want = vit(batch).numpy()
    path = tmp_path / "vit.onnx"
    torch.onnx.export(again, (batch,), str(path), input_names=["input"], opset_version=17, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": batch.numpy()})[0]
    assert float(np.abs(got - want).max()) <= 1e-4  # float32 re-association in ORT's MatMul kernels


def test_global_scope_still_removes_the_same_fraction_of_every_layers_heads() -> None:
    vit, x = tiny_vit(), _image()
    with torch.no_grad():  # uneven blocks: measured, a global ranking took 1 head of block 0 and 3 of block 1
        vit.encoder.layers[0].self_attention.qkv.weight.mul_(1e-3)
    prune_vision(vit, x, PruneOptions(target={"channels": 0.25}, heads_ratio=0.5, scope="global", round_to=1))
    assert [b.self_attention.heads for b in vit.encoder.layers] == [2, 2]


class PackedAttention(nn.Module):
    """The built-in ViT's attention before it kept q, k, v in a Linear: a packed parameter torch-pruning
    cannot see as a layer (it cut it along its last dimension and crashed in the next forward)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * 0.1)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = nn.functional.linear(x, self.in_proj_weight).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1) @ v  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class PackedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attention = PackedAttention()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8)
        x = self.embed(x)
        x = x + self.attention(x)
        return self.head((x + self.fc2(self.fc1(x).relu())).mean(1))


def test_a_packed_attention_parameter_is_refused_before_anything_changes() -> None:
    net, x = PackedNet(), torch.randn(1, 5, 8)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(StageError) as err:
        prune_vision(net, x, PruneOptions(target={"channels": 0.5}, round_to=1))
    message = str(err.value)
    assert "1 parameter(s) lie outside the layers torch-pruning resizes: attention.in_proj_weight (48, 16)" in message
    assert "prunable_heads" in message and "pinned_widths" in message
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "the model is unchanged"


def test_heads_ratio_needs_prunable_heads_and_must_leave_one() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(StageError, match="heads_ratio = 0.5: the model has no attention whose heads"):
        prune_vision(TwoConvNet(), x, PruneOptions(target={"channels": 0.5}, heads_ratio=0.5))
    with pytest.raises(StageError, match=r"of 4 heads, torch-pruning removes ceil\(0.8 x 4\) = 4, leaving none"):
        prune_vision(tiny_vit(), _image(), PruneOptions(target={"channels": 0.5}, heads_ratio=0.8))


def test_a_vit_prune_stage_runs_through_the_pipeline(tmp_path: Path, fashion_mnist: Path) -> None:
    """`prune: {heads_ratio, target}` on builtin:vit_ti_16, then an ONNX export that passes its parity check."""
    stages = """
  - prune: {importance: l2, heads_ratio: 0.34, target: {channels: 0.25}, round_to: 8, name: pruned}
  - export: {opset: 17, name: onnx-fp32}"""
    path = pipeline_yaml(tmp_path, fashion_mnist, name="vit-prune", source="builtin:vit_ti_16", stages=stages)
    text = path.read_text().replace("input_size: 28", "input_size: 32").replace("samples: 300", "samples: 32")
    # the 1000-class head kept (no num_classes): the model is evaluated as it is, so the gate is checked
    path.write_text(text.replace("top1_drop_max: 5.0", "top1_drop_max: 100").replace("  num_classes: 10\n", ""))
    code, _, records = run_quietly(path, tmp_path / "runs", "--no-bench")
    assert code == 0
    info = records["pruned"]["artifact"]["info"]
    assert info["layers_pruned"] == 24  # 12 blocks x (qkv: 3 heads -> 2, mlp.0: 768 -> 576)
    assert 0.3 < info["macs_reduction"] < 0.45
    assert records["onnx-fp32"]["artifact"]["info"]["parity_max_abs_diff"] < 1e-4
