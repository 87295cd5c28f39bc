"""Sampling token models (``rewardiff sample`` / sample_to_dir): masked and autoregressive
molecules models, Hugging Face models, their methods, budgets and guidance scales."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rewardiff.cli import app
from rewardiff.errors import UserError
from rewardiff.worlds.molecules import data as molecules
from tests.helpers import needs_shipped_molecules, needs_shipped_molecules_ar


def _invoke(*args: str):
    return CliRunner().invoke(app, ["sample", *args])


def test_sample_molecules_ar_best_of_n_keeps_the_best_candidate_by_rdkit_qed(tmp_path):
    """``--model molecules-ar --method best-of-n``: each output is the candidate of highest QED
    (RDKit, computed here) among the N sequences TokenModel.sample draws for its request."""
    from rdkit import Chem
    from rdkit.Chem import QED

    from rewardiff.guidance.sample import particle_seeds
    from rewardiff.worlds.molecules.autoregressive import molecules_ar_model

    needs_shipped_molecules_ar()
    res = _invoke("--model", "molecules-ar", "--method", "best-of-n", "--width", "3", "-n", "4", "--seed", "5", "--reward", "qed",
                  "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    texts = (tmp_path / "samples.txt").read_text().splitlines()
    assert texts == summary["texts"] and len(texts) == 4 and (tmp_path / "grid.png").is_file()
    m = molecules_ar_model()
    assert summary["nfe_per_sample"] == summary["expected_nfe_per_sample"] == 3 * m.max_len  # N sequences of L tokens

    def qed(s: str) -> float:
        mol = Chem.MolFromSmiles(s) if s else None
        return QED.qed(mol) if mol is not None and mol.GetNumAtoms() else 0.0

    for i, got in enumerate(texts):
        cands = m.texts(m.generate([""] * 3, particle_seeds(5 + i, 3)))
        assert got in cands and qed(got) == max(qed(c) for c in cands), (got, cands)
    assert summary["reward_mean"] == pytest.approx(sum(qed(s) for s in texts) / 4, abs=1e-6)


def test_sample_molecules_ar_base_is_token_model_sample(tmp_path):
    """``--method base`` (and best-of-n with N = 1) writes exactly TokenModel.sample's sequences of the seeds."""
    from rewardiff.worlds.molecules.autoregressive import molecules_ar_model

    needs_shipped_molecules_ar()
    m = molecules_ar_model()
    want = m.texts(m.generate([""] * 3, [0, 1, 2]))
    for extra in ([], ["--method", "best-of-n", "--width", "1", "--reward", "qed"]):
        out = tmp_path / str(len(extra))
        res = _invoke("--model", "molecules-ar", "-n", "3", "--out", str(out), *extra)
        assert res.exit_code == 0, res.output
        assert (out / "samples.txt").read_text().splitlines() == want
        assert json.loads((out / "summary.json").read_text())["nfe"] == 3 * m.max_len


def test_sample_hf_model_best_of_n_within_an_nfe_budget(gpt2_dir, tmp_path):
    """``--model hf:DIR``: a budget of 2 L + 10 NFE a sample buys N = 2 sequences of L tokens."""
    L = molecules.tokenizer().max_len
    res = _invoke("--model", f"hf:{gpt2_dir}", "--method", "best-of-n", "--nfe-budget", str(2 * L + 10), "-n", "3", "--reward", "qed",
                  "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 3 and (tmp_path / "grid.png").is_file()
    assert summary["method"] == "best-of-n" and summary["options"] == {"n": 2} and summary["reward_calls_per_sample"] == 2
    assert summary["nfe"] == 3 * 2 * L and summary["nfe_budget"] == 2 * L + 10


@pytest.mark.parametrize("model", ["molecules-ar", "hf"])
def test_sample_autoregressive_refuses_diffusion_methods_in_one_line(model, gpt2_dir, tmp_path):
    if model == "molecules-ar":
        needs_shipped_molecules_ar()
    name = model if model == "molecules-ar" else f"hf:{gpt2_dir}"
    res = _invoke("--model", name, "--method", "svdd-pm", "--reward", "qed", "--eta", "0", "--out", str(tmp_path))
    assert isinstance(res.exception, UserError)
    msg = str(res.exception)
    assert "\n" not in msg and "svdd-pm" in msg and "base or best-of-n" in msg


def test_sample_command_writes_smiles_with_svdd_on_qed(tmp_path):
    from rewardiff.sampling import sample_to_dir

    needs_shipped_molecules()
    summary = sample_to_dir(tmp_path, "molecules", None, ["ignored"], 4, 0, "qed", 8, None, None, "svdd-pm", 3)
    assert summary["guidance_scale"] == 1.0 and summary["nfe_per_sample"] == 1 + 3 * 7
    assert len(summary["texts"]) == 4 and all(summary["texts"])
    assert (tmp_path / "samples.txt").read_text().split() == summary["texts"]
    assert (tmp_path / "grid.png").is_file()  # the molecules drawn
    assert 0.0 < summary["reward_mean"] <= 1.0


@pytest.mark.parametrize("model", ["molecules", "molecules-ar"])
def test_explicit_guidance_scale_on_an_unconditional_model_is_a_user_error(model, tmp_path):
    if model == "molecules":
        needs_shipped_molecules()
    else:
        needs_shipped_molecules_ar()
    res = _invoke("--model", model, "--guidance-scale", "3", "-n", "1", "--out", str(tmp_path / "a"))
    assert isinstance(res.exception, UserError)
    assert "\n" not in str(res.exception) and "--guidance-scale 3" in str(res.exception) and "unconditional" in str(res.exception)
    assert not (tmp_path / "a").exists()
    res = _invoke("--model", model, "--guidance-scale", "1", "-n", "1", "--steps", "4", "--out", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output  # 1 is no guidance: accepted
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["guidance_scale"] == 1.0


def test_default_guidance_scale_is_two_for_conditional_models_and_one_otherwise():
    from rewardiff.sampling import resolve_guidance_scale

    class M:
        name, conditional = "m", True

    assert resolve_guidance_scale(M(), None) == 2.0 and resolve_guidance_scale(M(), 3.5) == 3.5
    M.conditional = False
    assert resolve_guidance_scale(M(), None) == 1.0 and resolve_guidance_scale(M(), 1.0) == 1.0
    with pytest.raises(UserError, match="--guidance-scale 2 does not apply"):
        resolve_guidance_scale(M(), 2.0)
