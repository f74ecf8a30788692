"""Tests of graft_t2i.py and t2i_unet.py (issue: GRAFT / P-GRAFT for text-to-image, part 1): the sampler, CFG,
stitching, the shaped loss, per-prompt Top-K, DDPO's log-probs and advantages, resume, bad input, end to end.
Tiny configs: a UNet of width 8 on 4-8 DDIM steps, a few images; seconds each."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import acceptance
import common
import graft_t2i as gt
from t2i_world import CATEGORIES, split_prompts, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--ch", "8", "--ch_mult", "1,2"]
PROMPTS = ["a red circle", "two blue squares", "a circle and a square"]


def _net(seed=0, zero_out=False):
    torch.manual_seed(seed)
    net = gt.build_model(gt.model_config(gt.parse_args(TINY))).eval()
    if not zero_out:                     # the output layer starts at zero: give it weights (eps depends on x)
        nn.init.normal_(net.out[-1].weight, std=0.1)
    return net


@pytest.fixture(autouse=True)
def no_judge(monkeypatch, tmp_path):
    """The tests do not depend on whether (or which) judge checkpoint this checkout holds."""
    monkeypatch.setattr(gt, "VQA", str(tmp_path / "absent_vqa_{}.pt"))
    gt.get_judge.cache_clear()
    yield
    gt.get_judge.cache_clear()


@pytest.fixture(scope="module")
def abar():
    return gt.make_abar({"schedule": "cosine", "T": 1000})


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    net, cfg = _net(), gt.model_config(gt.parse_args(TINY))
    path = str(tmp_path_factory.mktemp("ref") / "tiny.pt")
    common.save_checkpoint(path, {"ema": net.state_dict()}, {"model": cfg})
    return path


class _Recorder(nn.Module):
    """Wraps a network and records the integer time steps it is called at (to check the stitching)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

        self.clip_x0, self.latent_shape, self.tokenize, self.decode = net.clip_x0, net.latent_shape, \
            net.tokenize, net.decode

    def encode(self, ids):
        return self.net.encode(ids)

    def forward(self, x, t, ids=None, ctx=None):
        self.calls.append(int(t[0]))
        return self.net(x, t, ids, ctx)


def test_unet_shapes_and_padding_mask():
    net = _net()
    ids = tokenize(["a red circle", "a purple square left of a yellow triangle"])
    out = net(torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0]), ids)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    empty = net(torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0]), torch.zeros_like(ids))   # CFG's null
    assert torch.isfinite(empty).all()
    # padding is masked: a prompt's encoding does not depend on what its padding tokens would embed to
    tok, real = net.encode(ids[:1])
    with torch.no_grad():
        net.text.word.weight[0] += 1.0
    tok2, _ = net.encode(ids[:1])
    assert torch.allclose(tok[real], tok2[real], atol=1e-5)


def test_ddim_eta0_is_deterministic(abar):
    net = _net()
    x1 = gt.sample(net, net, PROMPTS, abar, 5, eta=0.0, w=2.0, gen=torch.Generator().manual_seed(3))["x0"]
    torch.manual_seed(999)                                   # the global RNG state must not matter
    torch.randn(10)
    x2 = gt.sample(net, net, PROMPTS, abar, 5, eta=0.0, w=2.0, gen=torch.Generator().manual_seed(3))["x0"]
    assert torch.equal(x1, x2)
    # with eta = 0 only x_T matters: other step noise, same image
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        x3 = gt.ddim_steps(net, x_T, tokenize(PROMPTS), abar, 5, 5, 0, 0.0, 2.0,
                           torch.Generator().manual_seed(77))
    assert torch.equal(x1, x3)
    x4 = gt.sample(net, net, PROMPTS, abar, 5, eta=1.0, w=2.0, gen=torch.Generator().manual_seed(3))["x0"]
    assert not torch.allclose(x1, x4)                        # eta = 1 is stochastic


def test_logp_matches_normal_density(abar):
    torch.manual_seed(0)
    x_t, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    mean, std = gt.ddim_mean_std(eps, x_t, abar, 600, 500, 1.0)
    assert float(std) > 0
    x = mean + std * torch.randn_like(mean)
    direct = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(gt.gaussian_logp(x, mean, std), direct, atol=1e-5)
    # eta = 1 is DDPM's posterior: std^2 = (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)
    a_t, a_s = abar[600], abar[500]
    assert torch.allclose(std ** 2, (1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    assert float(gt.ddim_mean_std(eps, x_t, abar, 50, 0, 1.0)[1]) == 0         # the last step: abar_0 = 1


def test_trajectory_logps_are_the_steps_densities(abar):
    net = _net()
    res = gt.sample_trajectories(net, PROMPTS, abar, 4, 1.5, gen=torch.Generator().manual_seed(0))
    assert res["traj"].shape == (3, 5, 3, 32, 32) and res["logp"].shape == (3, 4)
    tau, ids = common.time_grid(1000, 4), tokenize(PROMPTS)
    with torch.no_grad():
        ctx, null = gt.contexts(net, ids, 1.5)
        j = 1                                                    # step tau_3 -> tau_2
        eps = gt.guided_eps(net, res["traj"][:, j], torch.full((3,), float(tau[3])), ctx, null, 1.5)
        mean, std = gt.ddim_mean_std(eps, res["traj"][:, j], abar, tau[3], tau[2], 1.0)
    direct = torch.distributions.Normal(mean, std).log_prob(res["traj"][:, j + 1]).flatten(1).mean(1)
    assert torch.allclose(res["logp"][:, j], direct, atol=1e-4)
    assert torch.equal(res["traj"][:, -1], res["x0"]) and torch.equal(res["logp"][:, -1], torch.zeros(3))


def test_cfg_with_guidance_one_is_the_conditional_model():
    net, ids = _net(), tokenize(PROMPTS)
    x, t = torch.randn(3, 3, 32, 32), torch.full((3,), 400.0)
    with torch.no_grad():
        ctx, null = gt.contexts(net, ids, 3.0)
        assert torch.allclose(gt.guided_eps(net, x, t, ctx, None, 1.0), net(x, t, ids), atol=1e-5)
        eps_u = net(x, t, torch.zeros_like(ids))
        g = gt.guided_eps(net, x, t, ctx, null, 3.0)
        assert torch.allclose(g, eps_u + 3.0 * (net(x, t, ids) - eps_u), atol=1e-4)
        assert not torch.allclose(g, net(x, t, ids), atol=1e-3)


def test_stitched_sampler_calls_the_finetuned_model_above_s(abar):
    N, N_I = 8, 3
    hi, lo = _Recorder(_net(1)), _Recorder(_net(2))
    out = gt.sample(hi, lo, PROMPTS, abar, N, N_I, w=2.0, batch=2, gen=torch.Generator().manual_seed(0))
    tau = common.time_grid(1000, N).tolist()
    per_batch_hi, per_batch_lo = [tau[k] for k in range(N, N_I, -1)], [tau[k] for k in range(N_I, 0, -1)]
    assert hi.calls == per_batch_hi * 2 and lo.calls == per_batch_lo * 2          # batches of 2 and 1
    assert min(hi.calls) > tau[N_I] >= max(lo.calls)
    assert out["x0"].shape == out["x_s"].shape == (3, 3, 32, 32)
    # x_s is the state at s: finishing it with lo (same step noise) gives the same images
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        x_s = gt.ddim_steps(hi.net, x_T, tokenize(PROMPTS[:2]), abar, N, N, N_I, 1.0, 2.0, g)
        x0 = gt.ddim_steps(lo.net, x_s, tokenize(PROMPTS[:2]), abar, N, N_I, 0, 1.0, 2.0, g)
    assert torch.allclose(x_s, out["x_s"][:2], atol=1e-5)
    assert torch.allclose(x0, out["x0"][:2], atol=1e-5)


def test_shaped_loss_is_ddpm_loss_at_abar_s_one(abar):
    net, ids = _net(), tokenize(PROMPTS)
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    loss = gt.shaped_loss(net, x0, ids, abar, 1, 1000, 1.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1, 1001, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].view(3, 1, 1, 1)
    ddpm = ((net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), ids) - eps) ** 2).mean()
    assert torch.allclose(loss, ddpm, atol=1e-6)
    # p_uncond = 1 trains the empty prompt only
    l_null = gt.shaped_loss(net, x0, ids, abar, 1, 1000, 1.0, torch.Generator().manual_seed(5), p_uncond=1.0)
    l_ref = gt.shaped_loss(net, x0, torch.zeros_like(ids), abar, 1, 1000, 1.0,
                           torch.Generator().manual_seed(5))
    assert torch.allclose(l_null, l_ref, atol=1e-6)
    # v = True is v-prediction's loss: |G - v|^2 of the network's own v-output G, i.e. the eps error / abar_t
    lv = gt.shaped_loss(net, x0, ids, abar, 1, 1000, 1.0, torch.Generator().manual_seed(5), v=True)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    G = (net(x_t, t.float(), ids) - (1 - a).sqrt() * x_t) / a.sqrt()
    v_target = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(lv, ((G - v_target) ** 2).mean(), rtol=1e-3)


def test_shaped_loss_scales_by_c_t(abar):
    """With abar_s < 1 the target field is eps/c_t: a net that outputs c_t eps' exactly has zero loss."""
    s, abar_s = 250, float(abar[250])
    x_s = torch.randn(2, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(s + 1, 1001, (2,), generator=g)
    eps = torch.randn(x_s.shape, generator=g)
    ratio = (abar[t] / abar_s).view(2, 1, 1, 1)
    c_t = ((1 - abar[t]).view(2, 1, 1, 1) / (1 - ratio)).sqrt()
    oracle = lambda x, tt, ids: c_t * (x - ratio.sqrt() * x_s) / (1 - ratio).sqrt()
    loss = gt.shaped_loss(oracle, x_s, tokenize(PROMPTS[:2]), abar, s + 1, 1000, abar_s,
                          torch.Generator().manual_seed(1))
    assert float(loss) < 1e-8


def test_per_prompt_top_k_keeps_exactly_k_best_per_prompt():
    P, M, K = 5, 12, 3
    rng = np.random.default_rng(0)
    r = torch.tensor(rng.random(P * M))
    groups = np.repeat(np.arange(P), M)
    acc = acceptance.accept(r, "top_k", K=K * P, groups=groups).numpy()
    assert len(acc) == P * K
    for p in range(P):
        mine = acc[groups[acc] == p]
        assert len(mine) == K
        assert set(mine) == set(p * M + np.argsort(-r[p * M:(p + 1) * M].numpy())[:K])
    # a prompt with all-high rewards does not take another's slots
    r2 = r.clone()
    r2[:M] += 10
    acc2 = acceptance.accept(r2, "top_k", K=K * P, groups=groups).numpy()
    assert (np.bincount(groups[acc2], minlength=P) == K).all()


def test_per_prompt_stat_tracker():
    tr = gt.PerPromptStatTracker(32, min_count=4)
    prompts, r = ["a", "a", "a", "a", "b", "b"], np.array([1.0, 2.0, 3.0, 4.0, 10.0, 30.0])
    adv = tr.update(prompts, r).numpy()
    a = r[:4]
    assert np.allclose(adv[:4], (a - a.mean()) / (a.std() + 1e-6), atol=1e-5)           # own stats
    assert np.allclose(adv[4:], (r[4:] - r.mean()) / (r.std() + 1e-6), atol=1e-5)      # < min_count: batch
    adv = tr.update(["b", "b"], np.array([20.0, 20.0])).numpy()                       # buffer b: 10 30 20 20
    assert np.allclose(adv, 0, atol=1e-6)


def test_prompt_pools_use_the_split():
    args = gt.parse_args([])
    pools, ev = gt.finetune_pools(args), gt.eval_prompts(args)
    heldout = {p for v in split_prompts().values() for p in v["heldout"]}
    assert all(p not in heldout for v in pools.values() for p in v)
    assert len(ev) == 1000 and set(ev) <= heldout
    cats = {gt.parse_prompt(p).category for p in ev}
    assert cats == {"two_objects", "counting", "colours", "position", "colour_attribution"}


def _argv(ref, out, *extra):
    return ["--ref", ref, "--out", str(out), *TINY, "--N", "4", "--M", "4", "--K", "2", "--prompts_per_round",
            "3", "--ft_steps", "2", "--batch_size", "4", "--n_eval", "20", "--n_i", "0.5",
            "--sample_batch", "8", "--reward", "checker", *extra]


def test_resume_after_interrupted_round_matches_uninterrupted_run(tiny_ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    straight = gt.main(_argv(tiny_ref, tmp_path / "a", "--rounds", "3"))
    real_train, calls = gt.train_on_accepted, []

    def crash_in_round_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*a, **k)

    monkeypatch.setattr(gt, "train_on_accepted", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        gt.main(_argv(tiny_ref, tmp_path / "b", "--rounds", "3"))
    assert len(common.load_checkpoint(str(tmp_path / "b" / "state.pt"))["extra"]["rounds"]) == 1
    monkeypatch.setattr(gt, "train_on_accepted", real_train)
    resumed = gt.main(_argv(tiny_ref, tmp_path / "b", "--rounds", "3"))
    a, b = (common.load_checkpoint(str(tmp_path / d / "state.pt")) for d in "ab")
    # equal up to float rounding: CPU reductions (GroupNorm) can round differently in another process state;
    # an unseeded or wrongly seeded round would differ at the scale of the updates (1e-3 and up)
    for k, v in a["state_dicts"]["model"].items():
        assert torch.allclose(v, b["state_dicts"]["model"][k], atol=1e-5, rtol=0), k
    strip = lambda rows: [{k: v for k, v in r.items() if "wall" not in k and "per_s" not in k} for r in rows]
    assert strip(a["extra"]["rounds"]) == strip(b["extra"]["rounds"])
    assert straight["finetuned"]["metrics"]["checker"] == resumed["finetuned"]["metrics"]["checker"]
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["round"] for line in f] == [1, 2, 3]


def test_resume_differs_without_the_state(tiny_ref, tmp_path, monkeypatch):
    """The check above can fail: a run whose round 2 starts from the reference weights ends elsewhere."""
    monkeypatch.chdir(tmp_path)
    gt.main(_argv(tiny_ref, tmp_path / "a", "--rounds", "2"))
    gt.main(_argv(tiny_ref, tmp_path / "b", "--rounds", "1", "--ft_lr", "1e-3"))
    a, b = (common.load_checkpoint(str(tmp_path / d / "state.pt"))["state_dicts"]["model"] for d in "ab")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_main_end_to_end_writes_results(tiny_ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra in (["--rounds", "2"], ["--rounds", "1", "--algo", "ddpo", "--ddpo_batch", "5"]):
        out = tmp_path / extra[-1]
        res = gt.main(_argv(tiny_ref, out, *extra))
        for f in ("results.json", "metrics.jsonl", "grid.png", "rounds.png"):
            assert (out / f).is_file(), f
        with open(out / "results.json") as f:
            saved = json.load(f)
        assert saved["task"] == "t2i"
        assert {"reference", "finetuned", "compute", "rounds", "config"} <= set(saved)
        m = saved["finetuned"]["metrics"]
        assert {"reward", "judge", "checker", "diversity", "per_category"} <= set(m)
        assert set(m["per_category"]) <= set(CATEGORIES) - {"single"}           # held-out prompts only
        nfe = 3 * 4 * 4 * 2 * int(extra[1])                   # P M N, two passes (CFG), rounds
        assert saved["compute"]["nfe_sampling"] == nfe and saved["compute"]["grad_calls"] > 0
        assert res["reference"]["n_samples"] == 20


def _spawn(*argv, code=None):
    cmd = [sys.executable] + (["-c", code] if code else [os.path.join(ROOT, "graft_t2i.py"), *argv])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))


def _one_line_error(p, *words):
    """A finished (or running: waited for) process failed with exactly one stderr line holding `words`."""
    _, err = p.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_input_is_one_error_line(tiny_ref, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_text("# mine\na red circle\n\na red circle on a table\n")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    net = gt.build_model(gt.model_config(gt.parse_args(["--ch", "16", "--ch_mult", "1,2"])))
    common.save_checkpoint(str(tmp_path / "mismatch.pt"), {"ema": net.state_dict()},
                           {"model": gt.model_config(gt.parse_args(TINY))})
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "o")
    cases = [(("--ref", tiny_ref, "--prompts", str(bad), "--out", out), ("prompts.txt:4",)),
             (("--K", "9", "--M", "4"), ("--K",)), (("--n_i", "1.0"), ("--n_i",)),
             (("--n_i", "-0.1"), ("--n_i",)),
             (("--reward", "clip"), ("--reward",)), (("--ref", str(corrupt), "--out", out), ("corrupt.pt",)),
             (("--ref", str(tmp_path / "mismatch.pt"), "--out", out), ("architecture",)),
             (("--ref", tiny_ref, "--out", str(tmp_path / "afile")), ("is a file",))]
    running = [(_spawn(*argv), words) for argv, words in cases]          # in parallel: imports dominate
    for p, words in running:
        _one_line_error(p, *words)
    assert not os.path.exists(out)                                      # nothing was created on the way


def test_nan_reward_is_one_error_line_and_keeps_finished_rounds(tiny_ref, tmp_path):
    out = tmp_path / "nan"
    argv = _argv(tiny_ref, out, "--rounds", "2", "--reward", "flaky")
    code = ("import sys, torch, graft_t2i as g\n"
            "g.VQA = '/nonexistent/vqa_{}.pt'\n"
            "calls = []\n"
            "def flaky(images, prompts):\n"
            "    calls.append(len(prompts))\n"                # the sampler scores each batch as it is made
            "    r = torch.zeros(len(prompts))\n"
            "    return r if sum(calls) <= 20 + 12 else r * float('nan')\n"   # reference eval, round 1, NaN
            "g.REWARDS['flaky'] = lambda args: flaky\n"
            f"g.main({[str(a) for a in argv]!r})\n")
    p = _spawn(code=code)
    _one_line_error(p, "NaN")
    st = common.load_checkpoint(str(out / "state.pt"))
    assert len(st["extra"]["rounds"]) == 1                                          # round 1 is kept
    with open(out / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1
    code_shape = code.replace("return r if sum(calls) <= 20 + 12 else r * float('nan')", "return r[:1]")
    _one_line_error(_spawn(code=code_shape.replace(str(out), str(tmp_path / "shape"))), "shape")


def _torchrun(script_args, cwd):
    """torchrun with 2 CPU processes (gloo), one thread each; returns after both exit, failing on an error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script_args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]


def test_ddp_gradient_of_the_shaped_loss_over_two_ranks_equals_one_process(tmp_path):
    """Each of 2 gloo ranks takes every 2nd example of the batch (the noise drawn for the whole batch); DDP's
    averaged gradient equals the whole batch's gradient in one process."""
    script = tmp_path / "grad.py"
    script.write_text(
        "import sys, torch, graft_t2i as gt\n"
        "from tests.test_t2i import _net, PROMPTS\n"
        "from t2i_world import tokenize\n"
        "import distributed\n"
        "distributed.init(torch.device('cpu'))\n"
        "net, abar = _net(1), gt.make_abar(gt.model_config(gt.parse_args(['--ch', '8', '--ch_mult', '1,2'])))\n"
        "x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))\n"
        "ids, gen = tokenize(PROMPTS + PROMPTS[:1]), torch.Generator().manual_seed(6)\n"
        "loss = gt.shaped_loss(distributed.ddp(net), x, ids, abar, 200, 1000, float(abar[200]), gen, p_uncond=0.5,"
        " shard=distributed.world())\n"
        "loss.backward()\n"
        "if distributed.is_main():\n"
        "    torch.save({k: p.grad for k, p in net.named_parameters()}, sys.argv[1])\n")
    _torchrun([str(script), str(tmp_path / "grads.pt")], ROOT)
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    net, abar = _net(1), gt.make_abar(gt.model_config(gt.parse_args(TINY)))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids = tokenize(PROMPTS + PROMPTS[:1])
    gt.shaped_loss(net, x, ids, abar, 200, 1000, float(abar[200]), torch.Generator().manual_seed(6),
                   p_uncond=0.5).backward()
    assert all(torch.allclose(p.grad, two[k], atol=1e-6, rtol=1e-4) for k, p in net.named_parameters())
    assert max(p.grad.abs().max() for p in net.parameters()) > 1e-4                  # not a vacuous zero


@pytest.mark.parametrize("method", [["--n_i", "0.5"],
                                    ["--algo", "ddpo", "--ddpo_lr", "1e-3", "--ddpo_batch", "5"]])
def test_torchrun_with_two_gloo_processes_equals_one_process(tiny_ref, tmp_path, monkeypatch, method):
    """torchrun --nproc_per_node 2: the sampler's batches are shared out and gathered (the reference's
    evaluation included), the training batch split over the ranks; every round's rewards and accepted set
    (their mean reward), the evaluations and the fine-tuned weights equal a one-process run's."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()               # separate reference-eval caches
    monkeypatch.chdir(tmp_path / "one")
    argv = _argv(tiny_ref, "out", "--rounds", "2", "--M", "6", "--K", "2", "--sample_batch", "5", *method)
    one = gt.main(argv)
    _torchrun([os.path.join(ROOT, "graft_t2i.py"), *argv], tmp_path / "two")
    with open(tmp_path / "two" / "out" / "results.json") as f:
        two = json.load(f)
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        for k in ("mean_reward", "checker", "accepted_mean_reward", "accepted", "grad_calls"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    for which in ("reference", "finetuned"):
        assert one[which]["metrics"]["reward"]["mean"] == pytest.approx(two[which]["metrics"]["reward"]["mean"],
                                                                        abs=1e-5)
    w1, w2 = (common.load_checkpoint(str(d / "out" / "state.pt"))["state_dicts"]["model"]
              for d in (tmp_path / "one", tmp_path / "two"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
