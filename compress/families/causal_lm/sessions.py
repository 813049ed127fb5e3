"""The decoder sessions of the causal-lm family, registered with `compress.backends` as kind "decoder".

Both follow `compress.backends.DecoderSession`: `logits` (perplexity), `prefill` / `decode` (benchmarks,
generation) and `continue_greedy` (the greedy continuations evaluation compares).

- `TorchCausalLM`: a transformers causal LM, eager, CPU.
- `OrtCausalLM`: a KV-cache ONNX decoder in ONNX Runtime: our export, or onnxruntime-genai's fused graph
  (no ``position_ids`` input: GroupQueryAttention derives positions from the attention mask; its head size
  is symbolic in the graph, so it is read from the ``genai_config.json`` beside it). Prefill
  (``past_sequence = 0``) and decode run the same graph; position ids, when the graph takes them, start at
  each row's first real token (left padding has mask 0), and each decode step feeds the ``present.*``
  outputs back as ``past_key_values.*``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.backends import register_session
from compress.families.causal_lm.export import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, describe_io

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.families.base import Adapter


class _GreedyDecoder:
    """`continue_greedy` over `prefill` / `decode`: plain greedy decoding with the KV cache, no stop tokens."""

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def decode(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def continue_greedy(self, prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        if n == 0:
            return out
        logits, state = self.prefill(np.asarray([prompt], dtype=np.int64), last_only=True)
        for i in range(n):
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (1, 1)
            out.append(int(nxt[0, 0]))
            if i < n - 1:
                logits, state = self.decode(nxt, state)
        return out


class TorchCausalLM(_GreedyDecoder):
    """A transformers causal LM as a decoder session (torch eager, CPU, `threads` intra-op threads)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, *, threads: int | None = None) -> None:
        self.model, self.threads = model.eval(), threads

    def _threads(self) -> Any:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return torch

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        torch = self._threads()
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
        return out.logits.float().numpy()

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, Any]:
        torch = self._threads()
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.from_numpy(attention_mask)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits.float().numpy(), (out.past_key_values, mask)

    def decode(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        torch = self._threads()
        past, mask = state
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), (out.past_key_values, mask)

    def reorder(self, state: Any, rows: np.ndarray) -> Any:
        """The cache with batch rows picked by `rows` (beam search's parent beams; may repeat rows)."""
        torch = self._threads()
        past, mask = state
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        past.reorder_cache(index)  # transformers' Cache: in place, as its own beam search does
        return past, mask[index]

    def continue_greedy(self, prompt: list[int], n: int) -> list[int]:
        """Greedy with the model's own cache and no attention mask (the figures of the reports so far).

        Not `model.generate`: its generation config (e.g. `min_new_tokens`, EOS handling) changes logits,
        which would make torch and ONNX continuations differ for reasons other than the model.
        """
        torch = self._threads()
        ids, past, out = torch.tensor([prompt], dtype=torch.long), None, []
        with torch.inference_mode():
            for _ in range(n):
                result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                ids = result.logits[:, -1:].argmax(-1)  # (1, 1)
                out.append(int(ids))
        return out


@dataclass
class KVState:
    """Cache between runs: presents (numpy arrays or OrtValues), the attention mask so far (B, total)."""

    past: dict[str, Any]
    attention_mask: np.ndarray

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class OrtCausalLM(_GreedyDecoder):
    """A KV-cache decoder in ONNX Runtime (the file `export.export_decoder` writes).

    With ``io_binding=True`` (the default) the presents stay ``OrtValue`` objects between steps and are
    bound as the next inputs, so they never round-trip through numpy; only the last position's logits are
    copied out. `session_config` entries (the artifact's `info["ort_session_config"]`) are set on the one
    session built.

    A graph whose logits are the last position's only (seq dim fixed at 1: onnxruntime-genai's builder with
    `prune_lm_head`, the default of `target: onnxruntime-genai`) gives full-sequence logits token by token: each
    token of a multi-token run is one cached step (`last_logits_only`), so perplexity and agreement are measured on
    the file that ships, as the Generator runs it.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        io_binding: bool = True,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        from compress.backends.onnxruntime_backend import session_options

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX decoder {onnx_path} not found")
        info = describe_io(onnx_path)
        names = {r["name"] for r in info["inputs"]}
        missing = {INPUT_IDS, ATTENTION_MASK} - names
        if missing or not info["num_layers"]:
            raise ValueError(
                f"{onnx_path} is not a KV-cache decoder: inputs {sorted(names)}; needs input_ids, "
                "attention_mask and past_key_values.{i}.key/value, position_ids optional (see causal_lm.export)"
            )
        self.path = onnx_path
        self.info = info
        self.takes_positions = POSITION_IDS in names
        self.num_layers = int(info["num_layers"])
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = _head_dim(onnx_path, info["head_dim"])
        self.kv_dtype = np.dtype(info["kv_dtype"])
        self.past_names = [r["name"] for r in info["inputs"] if r["name"].startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        absent = sorted(set(self.present_names) - {r["name"] for r in info["outputs"]})
        if absent or LOGITS not in {r["name"] for r in info["outputs"]}:
            raise ValueError(f"{onnx_path}: outputs lack {[LOGITS, *absent]}; a KV-cache decoder returns them")
        logits_dims = next(r["dims"] for r in info["outputs"] if r["name"] == LOGITS)
        self.last_logits_only = len(logits_dims) == 3 and logits_dims[1] == 1
        opts = session_options(threads, session_config)
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
        self.io_binding = io_binding
        self._ort = ort

    # -- one forward ------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, state: KVState, last_only: bool) -> tuple[np.ndarray, KVState]:
        if self.last_logits_only and ids.shape[1] > 1 and not last_only:
            return self._run_token_by_token(ids, state)
        return self._forward(ids, state, last_only)

    def _run_token_by_token(self, ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """Logits (B, T, V) of a graph that returns the last position's only: one cached step per token."""
        seq = ids.shape[1]
        past_length = state.length - seq  # `state.attention_mask` already covers `ids`
        step, rows = KVState(state.past, state.attention_mask[:, : past_length + 1]), []
        for t in range(seq):
            step.attention_mask = state.attention_mask[:, : past_length + t + 1]
            logits, step = self._forward(ids[:, t : t + 1], step, last_only=True)
            rows.append(logits)
        return np.concatenate(rows, axis=1), KVState(step.past, state.attention_mask)

    def _forward(self, ids: np.ndarray, state: KVState, last_only: bool) -> tuple[np.ndarray, KVState]:
        batch, seq = ids.shape  # (B, T)
        mask = state.attention_mask
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if self.takes_positions:
            positions = np.cumsum(mask, axis=1)[:, -seq:] - 1  # (B, T)
            feeds[POSITION_IDS] = np.maximum(positions, 0).astype(np.int64)
        if not self.io_binding:
            outs = self.session.run(None, {**feeds, **state.past})
            out_names = [o.name for o in self.session.get_outputs()]
            by_name = dict(zip(out_names, outs, strict=True))
            logits = by_name[LOGITS]
            past = {p: by_name[q] for p, q in zip(self.past_names, self.present_names, strict=True)}
            return (logits[:, -1:] if last_only else logits), KVState(past, mask)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in state.past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # OrtValues in output-binding order
        logits_val = outs[0]
        logits = logits_val.numpy()
        past = dict(zip(self.past_names, outs[1:], strict=True))
        return (logits[:, -1:] if last_only else logits), KVState(past, mask)

    def empty_state(self, attention_mask: np.ndarray) -> KVState:
        batch = attention_mask.shape[0]
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)  # (B, H, 0, D)
        return KVState({name: empty for name in self.past_names}, np.zeros((batch, 0), dtype=np.int64))

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, KVState]:
        """Run the prompt with an empty cache; returns logits (B, T, V) (or (B, 1, V)) and the cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, sequence); got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        state = self.empty_state(mask)
        state.attention_mask = mask
        return self._run(ids, state, last_only)

    def decode(self, input_ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """Append ``input_ids`` (B, T) (usually T = 1) to the cache; returns logits (B, T, V)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.concatenate([state.attention_mask, np.ones_like(ids)], axis=1)  # (B, total)
        return self._run(ids, KVState(state.past, mask), last_only=False)

    def reorder(self, state: KVState, rows: np.ndarray) -> KVState:
        """The cache with batch rows picked by `rows` (beam search's parent beams; may repeat rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        past = {
            name: np.ascontiguousarray((v if isinstance(v, np.ndarray) else v.numpy())[rows])
            for name, v in state.past.items()
        }
        return KVState(past, state.attention_mask[rows])

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full logits (B, T, V) of a batch of unpadded windows: the ``logits_fn`` of the metrics."""
        return self.prefill(input_ids)[0]


def _head_dim(onnx_path: Path, dim: int | str) -> int:
    """The KV cache's head size: the graph's dim, or (symbolic in onnxruntime-genai's graph) its genai_config."""
    if isinstance(dim, int) and dim > 0:
        return dim
    config = onnx_path.parent / "genai_config.json"
    if not config.is_file():
        raise ValueError(
            f"{onnx_path}: the past's head size is symbolic ({dim!r}) and no genai_config.json is beside it"
        )
    try:
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config}: model.decoder.head_size missing or not an integer ({e})") from None


@register_session("decoder", "torch")
def _torch_session(artifact: Artifact, adapter: Adapter, *, threads: int, **_: Any) -> TorchCausalLM:
    return TorchCausalLM(adapter.load_torch(artifact), threads=threads)


@register_session("decoder", "onnxruntime")
def _ort_session(
    artifact: Artifact, adapter: Adapter, *, threads: int, onnx_provider: str, session_config: Mapping[str, str]
) -> OrtCausalLM:
    if onnx_provider != "cpu":
        raise ValueError(f"onnx_provider = {onnx_provider!r}: causal-lm ONNX decoders run on the CPU provider only")
    return OrtCausalLM(artifact.main, threads=threads, session_config=session_config)
