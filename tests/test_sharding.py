"""The pieces of sharded training that run in one process (the two-process runs are in
test_multiprocess.py): which modules become FSDP units, the optimizer state's two layouts,
and what the sharded path refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewardiff.errors import UserError
from rewardiff.finetune import sharding
from rewardiff.finetune.config import FinetuneConfig


@pytest.fixture(scope="module")
def sd3_net(tmp_path_factory):
    from rewardiff.finetune.weights import attach_lora
    from rewardiff.models.registry import base_model
    from rewardiff.models.sd3 import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")
    model = base_model(f"diffusers:{pipe}")
    attach_lora(model, 2, 2.0)
    return model.net


def test_units_cover_every_parameter_innermost_first_and_never_a_container(sd3_net):
    units, top = sharding._units(sd3_net)
    names = {type(u).__name__ for u in units}
    assert "JointTransformerBlock" in names  # SD3's declared unsplittable block
    assert not any(isinstance(u, (nn.ModuleList, nn.ModuleDict)) for u in units)  # fully_shard needs a forward
    assert all(any(u is t for t in top) for u in units[-len(top):])  # the net's parts come last
    for i, u in enumerate(units):  # a unit is sharded only after every unit inside it
        inside = [v for v in u.modules() if v is not u]
        assert all(any(v is w for w in units[:i]) for v in inside if any(v is w for w in units))
    covered = {id(p) for u in units for p in u.parameters()}
    assert all(id(p) in covered for p in sd3_net.parameters())  # no parameter left whole (its gradient unsynced)
    assert len(top) >= 3  # the transformer and the text encoders, each its own unit


def test_optimizer_state_layouts_round_trip():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = [n for n, _ in net.named_parameters()]
    plain = opt.state_dict()
    by_name = sharding.named(plain, names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    assert torch.equal(by_name["state"]["2.weight"]["exp_avg"], plain["state"][2]["exp_avg"])
    back = sharding.indexed(by_name, names)
    assert back["param_groups"] == plain["param_groups"]
    assert all(torch.equal(back["state"][i][k], plain["state"][i][k]) for i in plain["state"] for k in plain["state"][i])
    opt.load_state_dict(back)  # torch accepts it as its own


def test_the_sharded_path_refuses_fp16_and_token_models(monkeypatch):
    class Tokens:
        name, capabilities = "gpt2-tiny", frozenset({"tokens", "autoregressive"})

    class Chain:
        name, capabilities = "shapes", frozenset({"chain", "gaussian"})

    with pytest.raises(UserError, match="fp16"):
        sharding.check(FinetuneConfig(fsdp=True, mixed_precision="fp16"), Chain())
    with pytest.raises(UserError, match="token models"):
        sharding.check(FinetuneConfig(fsdp=True), Tokens())
    sharding.check(FinetuneConfig(fsdp=True, mixed_precision="bf16"), Chain())
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not sharding.requested(FinetuneConfig()) and sharding.requested(FinetuneConfig(fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate's FSDP launch sets
    assert sharding.requested(FinetuneConfig())


def test_fsdp_with_one_process_says_it_trains_unsharded(tiny_model_dir, tmp_path):
    from rewardiff.finetune.trainer import Run

    cfg = FinetuneConfig(model=str(tiny_model_dir), reward="brightness", method="draft-k", k=1, steps=1, batch_size=2,
                         num_inference_steps=2, eval_samples=2, fsdp=True)
    with pytest.warns(UserWarning, match="one process"):
        run = Run(cfg, tmp_path / "run", progress=False)
    assert run.units == []
