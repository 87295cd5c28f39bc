"""Files written by an earlier layout of the package still load: fine-tuned weights and value models.

``tests/data/saved-v0.1/`` was written by rewardiff 0.1.0 as it was before the worlds became
folders (modules ``rewardiff.models.shapes``, ``rewardiff.models.molecules``,
``rewardiff.guidance.value``): a shapes model after one ``draft-k`` step with LoRA rank 2, the
masked molecules model after one ``gumbel`` step with LoRA rank 2, and a tiny value of shapes
states (``train_value``, 8 trajectories, widths (8, 8)). ``expected.safetensors`` holds what
that code computed from them: images of two (prompt, seed) pairs, molecules of two seeds, and
the value at two fixed noisy states.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from rewardiff.finetune.weights import load_finetuned

DATA = Path(__file__).resolve().parent / "data" / "saved-v0.1"
EXPECTED = load_file(str(DATA / "expected.safetensors"))


def test_a_shapes_lora_run_loads_and_draws_the_same_images():
    m = load_finetuned(DATA / "shapes-lora")
    x = m.generate(["two red circles", "one blue square"], [3, 4], num_inference_steps=3, guidance_scale=2.0)
    # 1e-4: float sums come out in another order with another thread count or CPU (1.7e-5 seen
    # under CI's test workers); a lost or misplaced LoRA tensor moves pixels by 1e-2 or more
    torch.testing.assert_close(x, EXPECTED["shapes-lora"], atol=1e-4, rtol=0)


def test_a_masked_molecules_lora_run_loads_and_draws_the_same_molecules():
    m = load_finetuned(DATA / "molecules-lora")
    ids = m.generate(["", ""], [5, 6], num_inference_steps=8).float()
    assert torch.equal(ids, EXPECTED["molecules-lora"])


def test_a_value_model_loads_and_gives_the_same_values():
    from rewardiff.rewards.value import load_value
    from rewardiff.worlds.shapes.denoiser import shapes_model

    v = load_value(DATA / "value-shapes")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = shapes_model().encode(["two red circles", "one blue square"])
    torch.testing.assert_close(v(x, 500, cond).detach(), EXPECTED["value-shapes"], atol=1e-6, rtol=0)
