"""FSDP (compress.fsdp): launch refusals, the sharded twin's push/pull and optimizer state, tied weights.

The fast tests shard over a 1-process gloo group in this process (fully_shard runs the same code path;
the shards are whole). The 2-process runs are the slow tests of test_ddp.py, parametrised over DDP and FSDP.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from llm_toys import VOCAB, tiny_llama
from torch import nn

from compress import distributed, fsdp
from compress.errors import ConfigError, StageError

FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "ACCELERATE_MIXED_PRECISION": "no",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"FSDP_VERSION": "1"}, "FSDP1 is not supported. Launch with --fsdp_version 2"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "Launch with it false: accelerate launch --use_fsdp"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "set `gradient_checkpointing: true` in the distill stage"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "--mixed_precision bf16 under FSDP is not supported"),
    ],
)
def test_an_fsdp_launch_we_would_not_honour_is_refused_at_the_start(monkeypatch, change, message) -> None:
    for key, value in {**FSDP_ENV, **change}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is joined
    distributed.processes.cache_clear()
    try:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", ".")) as error:
            distributed.processes()
        assert "--fsdp_cpu_ram_efficient_loading false --num_processes N -m compress.cli run" in str(error.value)
    finally:
        distributed.processes.cache_clear()
    for key in FSDP_ENV:
        monkeypatch.setenv(key, FSDP_ENV[key])
    fsdp.check_launch()  # the launch it names passes


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class _Net(nn.Module):
    """Two FSDP groups of their own (`_no_split_modules`, as in Hugging Face models) and a root group."""

    _no_split_modules = ["_Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _step(model: nn.Module, params: list, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_the_twin_trains_like_the_module_and_its_weights_and_optimizer_state_come_back_in_1_process_format(
    one_rank_group,
) -> None:
    torch.manual_seed(0)
    module, plain = _Net(), _Net()
    plain.load_state_dict(module.state_dict())
    sharded = fsdp.Sharded(module)
    assert len([m for m in sharded.twin.modules() if type(m).__name__.startswith("FSDP")]) == 3, "2 blocks + root"
    x = torch.randn(5, 6)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for _ in range(3):
        _step(sharded.model, sharded.parameters(), opt, x)
        _step(plain, list(plain.parameters()), ref, x)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sharded.pull()
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items()), "pull brought the training"
    for name, value in plain.state_dict().items():  # one rank: the same arithmetic (seen: identical)
        assert torch.allclose(module.state_dict()[name], value, atol=1e-7, rtol=0), name
    state, expected = sharded.optimizer_state(opt), ref.state_dict()
    assert state["state"].keys() == expected["state"].keys() and state["param_groups"][0]["params"] == list(range(6))
    for i, values in expected["state"].items():
        for key, value in values.items():
            assert torch.allclose(torch.as_tensor(state["state"][i][key]), value, atol=1e-7, rtol=0), (i, key)

    # push/pull round trip is exact, and a 1-process optimizer state loads into a fresh sharded optimizer
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    pushed = {k: v.clone() for k, v in module.state_dict().items()}
    sharded.push()
    sharded.pull()
    assert all(torch.equal(pushed[k], v) for k, v in module.state_dict().items())
    fresh = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    sharded.load_optimizer_state(fresh, expected)
    reloaded = sharded.optimizer_state(fresh)
    for i, values in expected["state"].items():
        assert torch.equal(torch.as_tensor(reloaded["state"][i]["exp_avg_sq"]), values["exp_avg_sq"]), i


def test_tied_decoder_weights_train_tied_and_a_tie_across_fsdp_groups_is_refused(one_rank_group) -> None:
    pytest.importorskip("transformers")
    llama = tiny_llama(tie=True).train()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    sharded = fsdp.Sharded(llama)  # embedding and head are both in the root group: one parameter
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8))
    before = llama.lm_head.weight.detach().clone()
    opt.zero_grad()
    sharded.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sharded.pull()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight, "still tied after pull"
    assert not torch.equal(before, llama.lm_head.weight), "trained"

    net = _Net()
    net.head.weight = nn.Parameter(torch.randn(3, 6))
    net.blocks[1].lin.weight = net.blocks[0].lin.weight  # tied across two FSDP groups
    with pytest.raises(StageError, match=r"blocks\.1\.lin\.weight is tied to|tied parameters across FSDP groups"):
        fsdp.Sharded(net)
