"""The molecules world: standardized data, the SELFIES tokenizer, the split and the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.worlds.molecules import data as molecules


def test_data_figures():
    smiles = molecules.load_smiles()
    assert 4500 < len(smiles) <= 4999  # 4,999 lines; a few unparseable, metal-bearing or duplicate
    assert len(set(smiles)) == len(smiles)
    assert all("." not in s and "@" not in s for s in smiles)  # largest fragment, no stereo
    assert smiles == molecules.load_smiles()  # fixed order
    tok = molecules.tokenizer()
    assert (tok.pad_id, tok.mask_id, tok.vocab[:2]) == (0, 1, ["<pad>", "<mask>"])
    assert tok.size == len(tok.vocab) and tok.max_len == molecules.MAX_LEN
    kept = molecules.kept_smiles()
    assert len(kept) / len(smiles) >= 0.97


def test_shipped_vocabulary_is_the_data_vocabulary():
    assert molecules.build_tokenizer().vocab == molecules.tokenizer().vocab


def test_round_trip_on_every_kept_molecule():
    tok = molecules.tokenizer()
    for split in molecules.SPLITS:
        ids, smiles = molecules.data(split)
        assert ids.dtype == torch.long and ids.shape == (len(smiles), tok.max_len)
        assert tok.decode_batch(ids) == smiles
        assert torch.equal(tok.encode(smiles[7]), ids[7])


def test_held_out_split_is_disjoint_and_deterministic():
    train, held = molecules.data("train")[1], molecules.data("held-out")[1]
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(molecules.kept_smiles())
    assert 0.08 < len(held) / (len(train) + len(held)) < 0.12
    assert all(molecules.is_held_out(s) for s in held) and not any(molecules.is_held_out(s) for s in train[:200])
    assert molecules.data("held-out")[1] == held
    with pytest.raises(UserError, match="valid: train, held-out"):
        molecules.data("test")


def test_decode_reads_up_to_the_first_pad_or_mask():
    tok = molecules.tokenizer()
    c, o = tok.vocab.index("[C]"), tok.vocab.index("[O]")
    assert tok.decode([c, c, o, 0, c, c]) == "CCO"  # after <pad>: ignored
    assert tok.decode([c, c, 1, o, 0]) == "CC"  # <mask> ends it like <pad>
    assert tok.decode(torch.zeros(tok.max_len, dtype=torch.long)) == ""
    assert tok.decode([]) == ""
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.decode([tok.size])


def test_encode_standardizes_and_rejects():
    tok = molecules.tokenizer()
    assert tok.decode(tok.encode("OCC.[Na+].[Cl-]")) == "CCO"
    assert tok.decode(tok.encode("C[C@H](N)C(=O)O")) == "CC(N)C(=O)O"
    with pytest.raises(UserError, match="cannot parse"):
        tok.encode("C1CC")
    with pytest.raises(UserError, match="limit is 56"):
        tok.encode("C" * 60)
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.encode("C[Si](C)(C)C")


def test_random_sequences_decode_to_valid_molecules():
    tok = molecules.tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, tok.size, (400, tok.max_len), generator=g)
    lengths = torch.randint(1, tok.max_len + 1, (400,), generator=g)
    ids[torch.arange(tok.max_len) >= lengths[:, None]] = tok.pad_id
    smiles = tok.decode_batch(ids)
    nonempty = [s for s in smiles if s]
    assert len(nonempty) > 380  # empty only when nothing but branch/ring symbols came first
    assert molecules.validity(nonempty) == 1.0


def test_tokenizer_save_load(tmp_path):
    tok = molecules.tokenizer()
    path = tok.save(tmp_path / "tok.json")
    again = molecules.Tokenizer.load(path)
    assert again.vocab == tok.vocab and again.max_len == tok.max_len
    (tmp_path / "bad.json").write_text(json.dumps({"vocab": ["[C]", "<pad>"], "max_len": 4}))
    with pytest.raises(UserError, match="bad.json"):
        molecules.Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="missing.json"):
        molecules.Tokenizer.load(tmp_path / "missing.json")


def test_metrics():
    generated = ["CCO", "OCC", "c1ccccc1", "", "C1CC", "CCN"]
    # valid: CCO, OCC (= CCO), benzene, CCN -> 4 of 6; distinct: 3 of 4
    assert molecules.validity(generated) == pytest.approx(4 / 6)
    assert molecules.uniqueness(generated) == pytest.approx(3 / 4)
    # distinct valid: CCO, benzene, CCN; CCO is in the training set -> 2 of 3 novel
    assert molecules.novelty(generated, ["CCO", "CCCC"]) == pytest.approx(2 / 3)
    assert molecules.validity([]) == molecules.uniqueness([""]) == molecules.novelty([""], ["C"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("world", ["molecules", "molecules-ar"])
def test_pretraining_cli_writes_a_card_that_matches_its_metrics(world, tmp_path):
    """`rewardiff pretrain` for 3 steps: the card's head agrees with the run's own files
    (steps, the mean loss of metrics.jsonl, the exported net's parameter count)."""
    from typer.testing import CliRunner

    from rewardiff.cli import app
    from rewardiff.worlds.molecules.masked import MaskedDenoiser
    from rewardiff.worlds.molecules.autoregressive import ARTransformer
    from rewardiff.report import read_metrics

    res = CliRunner().invoke(app, ["pretrain", world, "--out", str(tmp_path), "--steps", "3"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    rows = read_metrics(tmp_path)
    net = (MaskedDenoiser if world == "molecules" else ARTransformer).load(tmp_path / "model")
    assert card["steps_done"] == 3 and card["training"]["steps"] == 3
    assert card["final_loss_mean_last_200"] == pytest.approx(sum(r["loss"] for r in rows) / len(rows))
    assert card["parameters"] == sum(p.numel() for p in net.parameters())
    assert 0 <= card["validity"] <= 1 and (tmp_path / "model" / "card.md").is_file()
    assert card["yardsticks"]["fcd_n"] == 512 * card["validity"] and card["yardsticks_held_out"]["samples"] == 448
    assert "FCD" in (tmp_path / "model" / "card.md").read_text()
