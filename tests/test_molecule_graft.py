"""Tests of graft_molecule.py, part 2: acceptance on molecules, resume, reward errors
(issue: GRAFT on QM9)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import acceptance
import common
import graft_molecule as gm
from test_molecule import CFG_TINY, ROOT, _tetrahedral_ch4, _types


def _water(shift=0.0):
    ang = np.deg2rad(104.5 / 2)
    return gm.Molecule(np.array([[0, 0, 0], [0.96 * np.sin(ang), 0.96 * np.cos(ang), 0],
                                 [-0.96 * np.sin(ang), 0.96 * np.cos(ang), 0]]) + shift, _types("OHH"))


def test_dedup_keeps_one_copy_per_smiles():
    ch4 = gm.Molecule(*_tetrahedral_ch4())
    mols = [_water(), ch4, _water(shift=3.0), _water(shift=-1.0), ch4]
    keys = [m.smiles for m in mols]
    assert keys[0] == keys[2] == keys[3] != keys[1]
    r = gm.reward_stable(mols)
    assert r.tolist() == [1.0] * 5
    acc = acceptance.accept(r, "top_k", K=5, keys=keys)
    # one water, one methane: K is not filled by copies
    assert sorted(acc.tolist()) == [0, 1]
    assert acceptance.accept(r, "top_k", K=5).tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    torch.manual_seed(0)
    m = gm.build_model(CFG_TINY)
    path = str(tmp_path_factory.mktemp("ref") / "tiny.pt")
    common.save_checkpoint(path, {"model": m.state_dict(), "ema": m.state_dict()}, {"model": CFG_TINY})
    return path


def _argv(ref, out, *extra):
    return ["--ref", ref, "--out", str(out), "--N", "4", "--M", "12", "--K", "4", "--ft_steps", "2",
            "--batch_size", "4", "--n_eval", "6", "--reward", "atom_stable", "--n_i", "0.5", *extra]


def _final_state(out):
    return common.load_checkpoint(os.path.join(out, "state.pt"))


def test_resume_after_interrupted_round_matches_uninterrupted_run(tiny_ref, tmp_path, monkeypatch):
    straight = gm.main(_argv(tiny_ref, tmp_path / "a", "--rounds", "3"))

    real_train, calls = gm.train_on_accepted, []

    def crash_in_round_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user hits Ctrl-C in the middle of round 2
        return real_train(*a, **k)

    monkeypatch.setattr(gm, "train_on_accepted", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        gm.main(_argv(tiny_ref, tmp_path / "b", "--rounds", "3"))
    assert len(_final_state(tmp_path / "b")["extra"]["rounds"]) == 1     # round 1 survived the crash
    monkeypatch.setattr(gm, "train_on_accepted", real_train)
    resumed = gm.main(_argv(tiny_ref, tmp_path / "b", "--rounds", "3"))

    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for k, v in a["state_dicts"]["model"].items():
        assert torch.equal(v, b["state_dicts"]["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if "wall" not in k and "per_s" not in k} for r in rows]
    assert strip(a["extra"]["rounds"]) == strip(b["extra"]["rounds"])
    assert straight["finetuned"]["metrics"] == resumed["finetuned"]["metrics"]
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["round"] for line in f] == [1, 2, 3]


def test_resume_refuses_other_settings(tiny_ref, tmp_path):
    gm.main(_argv(tiny_ref, tmp_path, "--rounds", "1"))
    with pytest.raises(SystemExit, match="other settings"):
        gm.main(_argv(tiny_ref, tmp_path, "--rounds", "2", "--K", "3"))


def test_results_json_has_the_house_schema(tiny_ref, tmp_path):
    gm.main(_argv(tiny_ref, tmp_path, "--rounds", "1"))
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert {"task", "method", "n_i", "command", "config", "reference", "finetuned", "compute",
            "rounds"} <= set(res)
    assert res["method"] == "pgraft" and res["config"]["N_I"] == 2
    assert res["compute"]["nfe_sampling"] == 12 * 5 and res["compute"]["grad_calls"] == 2 * 4
    for key in ("mol_stable", "atom_stable", "valid", "unique", "novel"):
        m = res["finetuned"]["metrics"][key]
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert (os.path.exists(tmp_path / "molecules_reference.png")
            or res["reference"]["metrics"]["valid"]["mean"] == 0)


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_bad_reward_stops_with_one_line(tiny_ref, tmp_path, bad):
    """A user's reward returning NaN or the wrong shape stops the run with a clear line, no traceback."""
    code = (f"import sys, torch, graft_molecule as gm; sys.argv = ['graft_molecule.py'] + "
            f"{_argv(tiny_ref, tmp_path, '--rounds', '1')!r}; "
            f"gm.REWARDS['atom_stable'] = lambda mols: "
            + ("torch.full((len(mols),), float('nan'))" if bad == "nan" else "torch.zeros(len(mols), 2)")
            + "; gm.main()")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert (last.startswith("graft_molecule: the reward returned")
            and ("NaN" in last if bad == "nan" else "shape" in last))


def test_rp_and_ddpo_run_and_account_gradient_calls(tiny_ref, tmp_path):
    rp = gm.main(_argv(tiny_ref, tmp_path / "rp", "--rounds", "1", "--rp"))
    assert rp["method"] == "rpgraft"
    dd = gm.main(_argv(tiny_ref, tmp_path / "dd", "--rounds", "1", "--algo", "ddpo", "--ddpo_batch", "6",
                       "--ddpo_steps_frac", "0.5"))
    # DDPO trains round(0.5 * (N - 1)) = 2 of the N - 1 non-final steps of each of the M = 12 trajectories
    assert dd["method"] == "ddpo" and dd["compute"]["grad_calls"] == 12 * 2


def test_pretrain_resumes_and_refuses_other_sizes(tmp_path):
    """--pretrain is resumable: a second call continues at the saved step with the saved optimizer; a
    different architecture in the same --out is refused with one line."""
    size = ["--nf", "8", "--n_layers", "1", "--batch_size", "4", "--out", str(tmp_path)]
    gm.main(["--pretrain", "--train_steps", "3", *size])
    first = common.load_checkpoint(os.path.join(tmp_path, "ref.pt"))
    assert first["extra"]["step"] == 3 and first["config"]["model"]["nf"] == 8
    gm.main(["--pretrain", "--train_steps", "5", *size])
    second = common.load_checkpoint(os.path.join(tmp_path, "ref.pt"))
    assert second["extra"]["step"] == 5 and second["extra"]["wall_s"] >= first["extra"]["wall_s"]
    # Adam's state carried over, not reset
    assert second["state_dicts"]["opt"]["state"][0]["step"] == 5
    assert second["state_dicts"]["opt"]["param_groups"][0]["lr"] == 5e-4   # the preset's --lr
    # a new --lr wins over the saved one
    gm.main(["--pretrain", "--train_steps", "6", "--lr", "1e-4", *size])
    assert (common.load_checkpoint(os.path.join(tmp_path, "ref.pt"))
            ["state_dicts"]["opt"]["param_groups"][0]["lr"] == 1e-4)
    assert not torch.equal(first["state_dicts"]["ema"]["egnn.embedding.weight"],
                           second["state_dicts"]["ema"]["egnn.embedding.weight"])
    with pytest.raises(SystemExit, match="was trained with"):
        gm.main(["--pretrain", "--train_steps", "7", *size[:1], "16", *size[2:]])
    model, cfg = gm.load_reference(os.path.join(tmp_path, "ref.pt"), torch.device("cpu"), {})
    assert cfg["nf"] == 8 and isinstance(model, torch.nn.Module)
