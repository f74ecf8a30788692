"""Tests of common.py: schedules, acceptance rules (docs/method.md §2), checkpoints, confidence intervals."""
import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import acceptance
import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- noise schedule ----------------------------------------------------------------------------------------

def _edm_polynomial_schedule(T, s=1e-5, power=2.0):
    """EDM's polynomial_schedule + clip_noise_schedule
    (e3_diffusion_for_molecules, diffusion_utils), rewritten."""
    steps = T + 1
    x = np.linspace(0, steps, steps)
    alphas2 = (1 - (x / steps) ** power) ** 2
    alphas2 = np.concatenate([np.ones(1), alphas2])
    step = np.clip(alphas2[1:] / alphas2[:-1], 0.001, 1.0)
    alphas2 = np.cumprod(step)
    return (1 - 2 * s) * alphas2 + s


@pytest.mark.parametrize("T", [1000, 50])
def test_polynomial_2_schedule_equals_edm(T):
    abar = common.noise_schedule("polynomial_2", T)
    assert abar.shape == (T + 1,)
    np.testing.assert_allclose(abar, _edm_polynomial_schedule(T), rtol=0, atol=1e-12)
    assert np.all(np.diff(abar) < 0), "abar must decrease strictly from data to noise"
    assert abs(abar[0] - (1 - 1e-5)) < 1e-6
    assert 1e-5 <= abar[-1] < (1.01e-5 if T == 1000 else 2e-5)
    # the 0.001 clip is active at the last step only: without it abar[T] would be exactly the precision floor
    assert abar[-1] > 1e-5 + 1e-12


def test_noise_schedules_rejects_unknown_name():
    with pytest.raises(ValueError):
        common.noise_schedule("nosuch", 10)


# -- acceptance rules (docs/method.md §2) --------------------------------------------------------------------

def test_accept_top_k_returns_the_k_largest():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(50, generator=g)
    for K in (1, 5, 50):
        idx = acceptance.accept_top_k(r, K)
        assert len(idx) == K and len(set(idx.tolist())) == K
        assert set(idx.tolist()) == set(np.argsort(-r.numpy())[:K].tolist())
        rest = np.delete(r.numpy(), idx.numpy())
        assert rest.size == 0 or r[idx].min().item() >= rest.max()
    # ties are broken by index, deterministically
    assert acceptance.accept_top_k([1.0, 3.0, 3.0, 0.0, 3.0], 2).tolist() == [1, 2]
    assert acceptance.accept(np.array([1.0, 3.0, 2.0]), "top_k", K=2).tolist() == [1, 2]


def test_accept_dedup_keeps_one_copy_per_key_before_ranking():
    rewards = [5.0, 9.0, 9.0, 1.0, 7.0, 8.0]
    keys = ["a", "b", "b", None, "c", "b"]
    # without keys the duplicate 'b's crowd out 'c'
    assert acceptance.accept(rewards, "top_k", K=2).tolist() == [1, 2]
    # with keys: one 'b' (the first copy), the None key (no identity, e.g. invalid molecule) dropped
    assert acceptance.accept(rewards, "top_k", K=2, keys=keys).tolist() == [1, 4]
    assert sorted(acceptance.accept(rewards, "top_k", K=10, keys=keys).tolist()) == [0, 1, 4]
    assert acceptance.accept(rewards, "best_of_n", keys=keys).tolist() == [1]
    assert acceptance.accept(rewards, "threshold", tau=6.0, keys=keys).tolist() == [1, 4]
    assert acceptance.dedup_first(keys).tolist() == [0, 1, 4]
    assert acceptance.accept(rewards, "top_k", K=3, keys=[None] * 6).numel() == 0


def test_stratified_top_k_keeps_the_size_histogram_and_ranks_within_each_size():
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(3, 9, (1000,), generator=g).numpy()                  # the sampler's condition
    r = torch.randn(1000, generator=g).double() + torch.as_tensor(sizes) * 0.5  # big sizes score better
    quotas = acceptance.stratum_quotas(sizes, 100)
    assert sum(quotas.values()) == 100
    for s, k in quotas.items():
        assert abs(k - 100 * np.mean(sizes == s)) < 1                          # proportional, rounded
    acc = acceptance.accept(r, "top_k", K=100, groups=sizes).numpy()
    assert len(acc) == 100 and len(set(acc.tolist())) == 100
    for s, k in quotas.items():
        mine = acc[sizes[acc] == s]
        assert len(mine) == k
        others = np.setdiff1d(np.nonzero(sizes == s)[0], mine)
        assert r[mine].min() >= r[others].max()                                # the best k of that size
    plain = acceptance.accept(r, "top_k", K=100).numpy()
    assert np.mean(sizes[plain] == 8) > 0.5 > np.mean(sizes[acc] == 8)         # unstratified favours size 8
    # with de-duplication the quotas still come from all M draws;
    # a stratum short of survivors gives what it has
    keys = ["dup" if s == 8 else str(i) for i, s in enumerate(sizes)]
    acc = acceptance.accept(r, "top_k", K=100, keys=keys, groups=sizes).numpy()
    assert (sizes[acc] == 8).sum() == 1 and len(acc) == 100 - quotas[8] + 1


def test_accept_threshold_keeps_r_at_least_tau():
    r = torch.tensor([0.2, 0.5, 0.7, 0.5, 0.1])
    assert acceptance.accept(r, "threshold", tau=0.5).tolist() == [1, 2, 3]  # r >= tau, inclusive
    assert acceptance.accept(r, "threshold", tau=0.71).numel() == 0
    assert acceptance.accept(r, "threshold", tau=-1).tolist() == [0, 1, 2, 3, 4]


def test_best_of_n_is_the_argmax():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        r = torch.randn(17, generator=g)
        assert acceptance.accept(r, "best_of_n").tolist() == [int(torch.argmax(r))]


def test_accept_rejects_unknown_rule():
    with pytest.raises(ValueError):
        acceptance.accept([1.0, 2.0], "nosuch")


def _top_k_density(x, M, K, k_in_binom=None):
    """docs/method.md §2: p_acc(x) = (M/K) P[Binomial(M-1, 1 - F(r(x))) <= K-1] p_ref(x),
    for x ~ N(0,1), r(x) = x."""
    k_in_binom = K - 1 if k_in_binom is None else k_in_binom
    return (M / K) * stats.binom.cdf(k_in_binom, M - 1, stats.norm.sf(x)) * stats.norm.pdf(x)


def _cdf_from_density(grid, dens):
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    return cdf


def _ks(sample, grid, cdf):
    """sup |F_emp - F| over the sample points (both one-sided limits of the empirical CDF)."""
    xs = np.sort(sample)
    n = len(xs)
    F = np.interp(xs, grid, cdf)
    return max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))


def test_top_k_acceptance_matches_order_statistics():
    M, K, rounds = 10, 2, 20_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rounds, M, generator=g, dtype=torch.float64)           # p_ref = N(0, 1), r(x) = x
    acc = np.concatenate([x[i][acceptance.accept_top_k(x[i], K)].numpy() for i in range(rounds)])
    assert acc.shape == (rounds * K,)

    grid = np.linspace(-9, 9, 180_001)
    dens = _top_k_density(grid, M, K)
    cdf = _cdf_from_density(grid, dens)
    assert abs(cdf[-1] - 1) < 1e-8, "the order-statistics density must integrate to 1"
    # The two accepted samples of a round are dependent, so use a generous bound: Dvoretzky-Kiefer-Wolfowitz
    # at alpha = 1e-4 for the number of rounds (not of samples) is 0.0154.
    bound = np.sqrt(np.log(2 / 1e-4) / (2 * rounds))
    ks = _ks(acc, grid, cdf)
    assert ks < bound, f"KS {ks:.4f} >= {bound:.4f}"

    # the same statistic must reject wrong laws: p_ref itself, and K-1 replaced by K (renormalised)
    ks_ref = _ks(acc, grid, stats.norm.cdf(grid))
    wrong = _top_k_density(grid, M, K, k_in_binom=K)
    ks_wrong_k = _ks(acc, grid, _cdf_from_density(grid, wrong) / _cdf_from_density(grid, wrong)[-1])
    assert ks_ref > 5 * bound and ks_wrong_k > 3 * bound, (ks_ref, ks_wrong_k, bound)

    # density ratio p_acc / p_ref <= M/K (reached in the upper tail), hence KL(p_acc || p_ref) <= log(M/K)
    ratio = dens / stats.norm.pdf(grid)
    assert ratio.max() <= M / K + 1e-9 and ratio.max() > 0.999 * M / K
    mask = dens > 0
    kl = np.trapezoid(dens[mask] * np.log(ratio[mask]), grid[mask])
    assert 0 < kl <= np.log(M / K)
    # empirically too: the accepted mass on an interval is at most M/K times its mass under p_ref
    for lo, hi in [(1.0, 2.0), (2.0, np.inf), (0.5, 1.0)]:
        emp = np.mean((acc >= lo) & (acc < hi))
        ref = stats.norm.cdf(hi) - stats.norm.cdf(lo)
        assert emp <= M / K * ref * 1.05
    # and in the upper tail the ratio is close to the bound, as the formula says
    tail = grid >= 2.0
    formula_tail = np.trapezoid(dens[tail], grid[tail]) / stats.norm.sf(2.0)
    emp_tail = np.mean(acc >= 2.0) / stats.norm.sf(2.0)
    assert 0.9 * M / K < formula_tail <= M / K
    assert emp_tail == pytest.approx(formula_tail, rel=0.08)


# -- EMA ---------------------------------------------------------------------------------------------------

def test_ema_update_is_the_exponential_average_of_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for p in list(model.parameters()) + list(ema.parameters()):
        p.data.normal_()
    model.running_mean.normal_()
    before = [e.clone() for e in ema.parameters()]
    common.ema_update(ema, model, 0.9)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p)
    torch.testing.assert_close(ema.running_mean, model.running_mean)


# -- checkpoints ---------------------------------------------------------------------------------------------

def _tiny_state(out=8, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, out).state_dict()


def test_checkpoint_round_trip_is_atomic(tmp_path):
    sd = _tiny_state()
    path = tmp_path / "sub" / "ckpt.pt"
    cfg, extra = {"model": {"nf": 8, "attention": True}}, {"step": 7, "wall_s": 1.5}
    common.save_checkpoint(str(path), {"model": sd}, cfg, extra)
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"], "no .tmp file may be left behind"
    ck = common.load_checkpoint(str(path))
    assert ck["config"] == cfg and ck["extra"] == extra
    assert ck["state_dicts"]["model"].keys() == sd.keys()
    for k in sd:
        assert torch.equal(ck["state_dicts"]["model"][k], sd[k])
    # overwriting an existing checkpoint works and still leaves no temporary file
    common.save_checkpoint(str(path), {"model": _tiny_state(seed=1)}, cfg, extra)
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]
    assert not torch.equal(common.load_checkpoint(str(path))["state_dicts"]["model"]["weight"], sd["weight"])
    # a non-JSON-able config fails at save time and leaves the old file intact
    with pytest.raises(TypeError):
        common.save_checkpoint(str(path), {"model": sd}, {"bad": object()})
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]
    # a bare state_dict (e.g. a released model) is wrapped as the 'model' weights
    torch.save(sd, tmp_path / "bare.pt")
    ck = common.load_checkpoint(str(tmp_path / "bare.pt"))
    assert torch.equal(ck["state_dicts"]["model"]["bias"], sd["bias"])


class _Payload:
    """Unpickling this creates a file: only a weights_only=False load would do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_is_weights_only(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"config": {}, "state_dicts": {"model": _tiny_state()}, "extra": _Payload(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(common.CheckpointError):
        common.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not os.path.exists(marker)
    torch.save({"config": {}, "state_dicts": {}, "extra": Fraction(1, 3)}, tmp_path / "fraction.pt")
    with pytest.raises(common.CheckpointError):
        common.load_checkpoint(str(tmp_path / "fraction.pt"))


def test_load_checkpoint_missing_or_corrupt_raises_checkpoint_error(tmp_path):
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(common.CheckpointError, match="not a readable"):
        common.load_checkpoint(str(tmp_path / "random.pt"))
    common.save_checkpoint(str(tmp_path / "good.pt"), {"model": _tiny_state()}, {})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.CheckpointError):
        common.load_checkpoint(str(tmp_path / "truncated.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(common.CheckpointError, match="not a checkpoint dict"):
        common.load_checkpoint(str(tmp_path / "list.pt"))
    with pytest.raises(common.CheckpointError):
        common.load_checkpoint(str(tmp_path))  # a directory is not a checkpoint


def test_load_state_mismatch_is_one_line_checkpoint_error():
    model = torch.nn.Linear(4, 16)
    with pytest.raises(common.CheckpointError) as e:
        common.load_state(model, _tiny_state(out=8), "checkpoint 'x.pt'")
    msg = str(e.value)
    assert "\n" not in msg and "x.pt" in msg and "size mismatch" in msg
    with pytest.raises(common.CheckpointError) as e:
        common.load_state(model, {"weight": torch.zeros(16, 4)}, "checkpoint 'y.pt'")
    assert "\n" not in str(e.value) and "y.pt" in str(e.value)
    good = torch.nn.Linear(4, 16).state_dict()
    common.load_state(model, good, "ok")
    assert torch.equal(model.weight, good["weight"])


_HF_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import common
    out = {}
    out["path"] = common.resolve_ref("hf:org/repo/file.pt")
    out["nested"] = common.resolve_ref("hf:org/repo/sub/dir/w.pt")
    out["bias"] = common.load_checkpoint("hf:org/repo/file.pt")["state_dicts"]["model"]["bias"].tolist()
    for ref in ("hf:org/other/file.pt", "hf:org/repo/absent.pt", "hf:org/repo"):
        try:
            common.resolve_ref(ref)
            out[ref] = "resolved"
        except common.CheckpointError as e:
            out[ref] = "CheckpointError: " + str(e)
    print(json.dumps(out))
""")


def test_resolve_ref_hf_reads_the_local_hub_cache(tmp_path):
    cache = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--repo"
    snap = repo / "snapshots" / commit
    (snap / "sub" / "dir").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sd = _tiny_state()
    common.save_checkpoint(str(snap / "file.pt"), {"model": sd}, {"model": {}})
    (snap / "sub" / "dir" / "w.pt").write_bytes(b"x")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=ROOT)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-c", _HF_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert os.path.realpath(out["path"]) == os.path.realpath(snap / "file.pt")
    assert os.path.realpath(out["nested"]) == os.path.realpath(snap / "sub" / "dir" / "w.pt")
    assert out["bias"] == sd["bias"].tolist()
    for ref in ("hf:org/other/file.pt", "hf:org/repo/absent.pt", "hf:org/repo"):
        assert out[ref].startswith("CheckpointError: "), (ref, out[ref])
        assert "\n" not in out[ref]


# -- statistics ---------------------------------------------------------------------------------------------

def test_mean_ci95_is_wilson_for_binary_data():
    res = common.mean_ci95([1] * 8 + [0] * 2)
    assert res["mean"] == pytest.approx(0.8)
    lo, hi = res["ci95"]
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # Wilson, n = 10
    for k, n in [(8, 10), (0, 10), (10, 10), (37, 1000), (512, 1000)]:
        res = common.mean_ci95(np.array([True] * k + [False] * (n - k)))
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert res["ci95"] == pytest.approx([ref.low, ref.high], abs=1e-6)
        assert res["ci95"][0] - 1e-12 <= res["mean"] <= res["ci95"][1] + 1e-12  # k = n: upper is 1 - 1 ulp
    assert common.mean_ci95([0, 0, 0])["ci95"][1] > 0  # Wilson never collapses to a point at 0


def test_mean_ci95_is_normal_otherwise():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    res = common.mean_ci95(x)
    half = 1.959964 * np.std(x, ddof=1) / np.sqrt(5)
    assert res["mean"] == 3.0 and res["ci95"] == pytest.approx([3 - half, 3 + half])
    res = common.mean_ci95([0.0, 0.5, 1.0])  # not 0/1 data even though it lies in [0, 1]
    assert res["ci95"] == pytest.approx([0.5 - 1.959964 * 0.5 / np.sqrt(3),
                                         0.5 + 1.959964 * 0.5 / np.sqrt(3)])
    assert np.isnan(common.mean_ci95([])["mean"])
