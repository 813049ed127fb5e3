"""Vision Transformers (Dosovitskiy et al. 2020, arXiv 2010.11929) with torchvision's module names.

ViT-B/16 is torchvision's `vit_b_16`; ViT-S/16 and ViT-Ti/16 (DeiT's sizes, Touvron et al. 2020, arXiv
2012.12877) are timm's `vit_small_patch16_224` / `vit_tiny_patch16_224` under the same names:
`class_token`, `conv_proj`, `encoder.pos_embedding`, `encoder.layers.encoder_layer_N.{ln_1, self_attention
.{qkv, out_proj}, ln_2, mlp.{0,3}}`, `encoder.ln`, `heads.head`; torchvision's packed
`self_attention.in_proj_{weight,bias}` load as `self_attention.qkv` (`from_torchvision`). Attention is
written out (Q·Kᵀ, Softmax, ·V) rather than `nn.MultiheadAttention`, so the ONNX graph has the plain
MatMul / Softmax nodes INT8 quantization keeps apart (see compress/stages/quantize/int8.py).

Structured pruning (`compress.prune.vision`): q, k, v are one `nn.Linear` (timm's layout), which
torch-pruning's head pruning (`num_heads`, `prune_num_heads`) removes whole heads of, and the MLP's hidden
width is a Linear pair it prunes as channels. The number of heads follows the weights
(`qkv.out_features // (3 * head_dim)`), so a pruned model rebuilds from its Linear widths alone. The
residual width is pinned (`pinned_widths`): the class token and position embeddings are plain parameters
of that width.

`image_size` fixes the number of position embeddings; a checkpoint trained at another size is
interpolated on load (`resize_pos_embedding`), as torchvision's `interpolate_embeddings` does.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_EPS = 1e-6  # LayerNorm epsilon of both torchvision and timm ViTs


class SelfAttention(nn.Module):
    """Multi-head self-attention; `qkv` stacks q, k, v (each `heads * head_dim` wide) like torchvision's
    `in_proj_weight` and timm's `qkv`."""

    prunable_heads = "qkv"  # the packed q, k, v Linear whose heads compress.prune.vision may remove

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)

    @property
    def heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        nh, hs = self.heads, self.head_dim
        qkv = self.qkv(x).view(b, t, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)  # (B, nh, T, hs) each
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        y = att.softmax(dim=-1) @ v  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, nh * hs))  # (B, T, D)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=_EPS)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, depth: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim))
        self.ln = nn.LayerNorm(dim, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))

    def _load_from_state_dict(self, state, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        key = prefix + "pos_embedding"  # a checkpoint of another image size: resize its grid
        if key in state and state[key].shape[1] != self.pos_embedding.shape[1]:
            state[key] = resize_pos_embedding(state[key], self.pos_embedding.shape[1])
        super()._load_from_state_dict(state, prefix, *args, **kwargs)


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size: int, patch: int, depth: int, dim: int, heads: int, mlp_dim: int, num_classes: int = 1000
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.encoder = Encoder((image_size // patch) ** 2 + 1, depth, dim, heads, mlp_dim)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    #: the residual width is that of these parameters, which no pruner resizes (compress.prune.vision)
    pinned_widths = ("class_token", "encoder.pos_embedding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        return self.heads(self.encoder(x)[:, 0])  # class token (B, D) -> (B, classes)


def resize_pos_embedding(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, 1 + n², D) -> (1, tokens, D): the patch grid resized bicubically, the class token kept."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
    if old * old != pos.shape[1] - 1 or new * new != tokens - 1:
        raise ValueError(f"position embeddings of {pos.shape[1]} and {tokens} tokens are not square grids")
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)  # (1, tokens, D)


def vit_b_16(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    return VisionTransformer(image_size, 16, 12, 768, 12, 3072, num_classes)


def vit_s_16(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    return VisionTransformer(image_size, 16, 12, 384, 6, 1536, num_classes)


def vit_ti_16(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    return VisionTransformer(image_size, 16, 12, 192, 3, 768, num_classes)


_TIMM = (  # (timm pattern, torchvision replacement), applied in order
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^patch_embed\.proj\.", "conv_proj."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.encoder_layer_\1.self_attention.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
    (r"^norm\.", "encoder.ln."),
    (r"^head\.", "heads.head."),
)


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `vit_*_patch16_*` keys -> ours; timm's qkv Linear is ours."""
    return _renamed(state, _TIMM)


_TORCHVISION = ((r"\.self_attention\.in_proj_(weight|bias)$", r".self_attention.qkv.\1"),)


def from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's `vit_*` keys -> ours: its packed `in_proj_weight`/`in_proj_bias` are our `qkv` Linear."""
    return _renamed(state, _TORCHVISION)


def _renamed(state: dict[str, torch.Tensor], rules: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Each key renamed by the first rule that matches it (rules are tried in order)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out
