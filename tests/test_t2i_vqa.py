"""Tests of t2i_vqa.py: the shipped reward and judge separate held-out positives from hard negatives, the
scorer's interface, its errors, and a smoke training. Nothing here trains a network beyond a few steps."""
import functools
import os

import numpy as np
import pytest
import torch

import common
import t2i_vqa as vqa
import t2i_world as world

REWARD_MIN_AUC = 0.95        # the acceptance test of the issue
JUDGE_MIN_AUC = 0.95         # measured 0.98 on this set, minus a margin
N = 600                      # held-out positives and hard negatives each


@functools.lru_cache(maxsize=None)
def scorer(which):
    """The shipped scorer (never trains: a missing checkpoint is a failure, not a 10-minute test)."""
    path = vqa.CHECKPOINTS[which]
    if not os.path.isfile(path):
        pytest.fail(f"{path} is not shipped: python -c \"import t2i_vqa; t2i_vqa.load_scorer('{which}')\"")
    return vqa.load_scorer(which)


@functools.lru_cache(maxsize=None)
def heldout_pairs(seed=0):
    """A fixed set of N held-out positives and N held-out hard negatives (categories balanced, every kind):
    (images (2N, 3, 32, 32) in [-1, 1], prompts, labels (2N,))."""
    pairs = vqa.Pairs("heldout", seed)
    pos = pairs.batch(N, kind="positive")
    neg = pairs.batch(N, kind="hard")
    images = world.to_tensor(np.concatenate([pos[0], neg[0]]))
    return images, pos[1] + neg[1], np.concatenate([pos[2], neg[2]])


def heldout_auc(which):
    images, prompts, labels = heldout_pairs()
    assert labels[:N].all() and not labels[N:].any()
    p = scorer(which)(images, prompts).numpy()
    return vqa.roc_auc(p[labels == 1], p[labels == 0])


def test_roc_auc_is_exact():
    assert vqa.roc_auc([1, 2, 3], [0, 0.5]) == 1.0
    assert vqa.roc_auc([0], [1]) == 0.0
    assert vqa.roc_auc([1, 1], [1, 1]) == 0.5                          # ties count a half
    assert vqa.roc_auc([0.2, 0.8], [0.5]) == 0.5


def test_reward_auc_on_heldout_hard_negatives_is_at_least_095():
    auc = heldout_auc("reward")
    print(f"reward: held-out ROC AUC, positives vs hard negatives: {auc:.4f}")
    assert auc >= REWARD_MIN_AUC


def test_judge_auc_on_heldout_hard_negatives():
    auc = heldout_auc("judge")
    print(f"judge: held-out ROC AUC, positives vs hard negatives: {auc:.4f}")
    assert auc >= JUDGE_MIN_AUC


def test_scorer_interface():
    images, prompts, _ = heldout_pairs()
    x, prompts = images[::100], prompts[::100]                         # (12, 3, 32, 32)
    for which in ("reward", "judge"):
        score = scorer(which)
        p = score(x, prompts)
        assert p.shape == (len(x),) and p.dtype == torch.float32
        assert ((p >= 0) & (p <= 1)).all()
        assert torch.equal(p, score(x, prompts))                       # deterministic
        one_by_one = torch.cat([score(x[i:i + 1], prompts[i:i + 1]) for i in range(len(x))])
        torch.testing.assert_close(p, one_by_one, atol=1e-5, rtol=0)
        big = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
        p48 = score(big, prompts)
        assert p48.shape == (len(x),) and ((p48 >= 0) & (p48 <= 1)).all()
        assert score(x[:0], []).shape == (0,)


def test_48px_renders_score_like_32px_renders():
    pairs = vqa.Pairs("heldout", 5)
    scenes, specs, _ = zip(*[pairs.example()[:3] for _ in range(200)])
    prompts = [world.prompt(spec) for spec in specs]
    for which in ("reward", "judge"):
        p32 = scorer(which)(world.to_tensor(world.render_batch(scenes, 32)), prompts).numpy()
        p48 = scorer(which)(world.to_tensor(world.render_batch(scenes, 48)), prompts).numpy()
        assert ((p32 >= 0.5) == (p48 >= 0.5)).mean() >= 0.9, which


def test_out_of_grammar_prompt_raises():
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="not a prompt of the world's grammar"):
        scorer("reward")(x, ["a circle", "a photo of a cat"])
    with pytest.raises(ValueError):
        scorer("judge")(x, ["a circle"])                               # one prompt for two images


def test_corrupt_checkpoint_is_checkpoint_error(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(common.CheckpointError):
        vqa.load_scorer("reward", path=str(bad))


def test_mismatched_checkpoint_is_checkpoint_error(tmp_path):
    with pytest.raises(common.CheckpointError, match="not the reward"):
        vqa.load_scorer("reward", path=vqa.CHECKPOINTS["judge"])
    ckpt = common.load_checkpoint(vqa.CHECKPOINTS["reward"])
    sd = {k: v for k, v in ckpt["state_dicts"]["model"].items() if not k.startswith("head")}
    path = str(tmp_path / "truncated.pt")
    common.save_checkpoint(path, {"model": sd}, ckpt["config"])
    with pytest.raises(common.CheckpointError, match="does not fit"):
        vqa.load_scorer("reward", path=path)


def test_reward_and_judge_are_different_networks():
    reward, judge = scorer("reward"), scorer("judge")
    assert type(reward.model) is not type(judge.model)
    assert reward.config["arch"] != judge.config["arch"] and reward.config["seed"] != judge.config["seed"]
    assert set(reward.model.state_dict()) != set(judge.model.state_dict())
    assert vqa.n_params(reward.model) != vqa.n_params(judge.model)


def test_shipped_checkpoints_are_small_and_record_their_training():
    for which in ("reward", "judge"):
        assert os.path.getsize(vqa.CHECKPOINTS[which]) < 1.5e6
        s = scorer(which)
        assert s.config["size"] == 32 and s.config["steps"] > 0
        assert s.extra["eval_clean"]["heldout"]["hard_auc"] >= REWARD_MIN_AUC - 0.05
        assert {"command", "hardware", "train_wall_s"} <= set(s.extra["training"])


def test_train_scorer_smoke():
    for which in ("reward", "judge"):
        model, report = vqa.train_scorer(which, steps=10, seed=3, batch=16, progress=False)
        assert np.isfinite(report["final_loss"]) and report["steps"] == 10
        x = torch.zeros(2, 3, 32, 32)
        assert model(x, world.tokenize(["a circle", "two red squares"])).shape == (2,)
