"""Tests of graft_layout.py: LayoutGAN++ metrics, data loaders, the set denoiser, the stitched sampler,
FID, CLI."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import graft_layout as gl
import layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_TINY = dict(n_classes=5, d_model=32, n_layers=2, n_heads=4, T=1000, schedule="cosine",
                dataset="publaynet")


def _layout(ltrbs, classes=None, pad_to=6, pad_boxes=None):
    """One layout as the (1, pad_to, 4) centre-format boxes and (1, pad_to) labels the metrics take."""
    boxes = np.zeros((1, pad_to, 4), np.float64)
    labels = np.full((1, pad_to), -1, np.int64)
    n = len(ltrbs)
    boxes[0, :n] = gl.to_centre(np.asarray(ltrbs, np.float64))
    labels[0, :n] = classes if classes is not None else 0
    if pad_boxes is not None:  # junk in the padding slots: the metrics must not see it
        boxes[0, n:n + len(pad_boxes)] = gl.to_centre(np.asarray(pad_boxes, np.float64))
    return boxes, labels


# three boxes (left, top, right, bottom); by hand, the six coordinates (xl, xc, xr, yt, yc, yb) are
# B1 (0.2, 0.3, 0.4, 0.1, 0.2, 0.3), B2 (0.4, 0.55, 0.7, 0.5, 0.6, 0.7),
# B3 (0.25, 0.35, 0.45, 0.8, 0.85, 0.9);
# same-kind distances: B1-B2 min 0.2 (xl), B1-B3 min 0.05 (xl, xc, xr), B2-B3 min 0.15 (xl)
# so d = (0.05, 0.15, 0.05) and the layout's alignment is mean(-log(1 - d)).
THREE = [(0.2, 0.1, 0.4, 0.3), (0.4, 0.5, 0.7, 0.7), (0.25, 0.8, 0.45, 0.9)]
THREE_ALIGN = (-math.log(0.95) - math.log(0.85) - math.log(0.95)) / 3


def test_alignment_matches_hand_computed_values():
    assert gl.alignment(*_layout(THREE))[0] == pytest.approx(THREE_ALIGN, abs=1e-12)
    # two boxes: both have d = 0.2 (their xl), so -log(0.8) each
    assert gl.alignment(*_layout(THREE[:2]))[0] == pytest.approx(-math.log(0.8), abs=1e-12)
    # a shared left edge is perfect alignment, whatever else differs
    assert (gl.alignment(*_layout([(0.1, 0.1, 0.3, 0.2), (0.1, 0.5, 0.9, 0.95)]))[0]
            == pytest.approx(0, abs=1e-12))
    # classes play no part
    assert gl.alignment(*_layout(THREE, classes=[0, 3, 4]))[0] == pytest.approx(THREE_ALIGN, abs=1e-12)
    # the reward is the negative alignment x100, per layout
    b, l = _layout(THREE)
    assert float(gl.reward_alignment(b, l)[0]) == pytest.approx(-100 * THREE_ALIGN, abs=1e-9)


def test_alignment_ignores_padding_and_gives_zero_to_single_elements():
    # junk in the padding slots that would align perfectly with B1 (identical box) must change nothing
    junk = [THREE[0], (0.0, 0.0, 1.0, 1.0)]
    assert gl.alignment(*_layout(THREE, pad_boxes=junk))[0] == pytest.approx(THREE_ALIGN, abs=1e-12)
    # a one-element layout: no partner, d = 1 in LayoutGAN++'s code, mapped to 0 there and here
    for box in [(0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0)]:
        assert gl.alignment(*_layout([box], pad_boxes=[THREE[1]]))[0] == 0.0
    # batches: per-layout values, the mean over valid elements only (padding does not dilute it)
    b1, l1 = _layout(THREE, pad_to=4)
    b2, l2 = _layout([THREE[0]], pad_to=4)
    a = gl.alignment(np.concatenate([b1, b2]), np.concatenate([l1, l2]))
    np.testing.assert_allclose(a, [THREE_ALIGN, 0.0], atol=1e-12)


def _layoutganpp_alignment(bbox, mask):
    """LayoutGAN++'s compute_alignment (ktrk115/const_layout metric.py), re-derived: diagonal and padded rows
    set to 1 before the min, d = 1 mapped to 0, sum / number of real elements. Padded *columns* are not masked
    there, so it agrees with docs/method.md §6 on layouts without padding, which is how it is used below."""
    xc, yc, w, h = bbox.unbind(-1)
    X = torch.stack([xc - w / 2, xc, xc + w / 2, yc - h / 2, yc, yc + h / 2], 1)    # (B, 6, n)
    X = (X[..., :, None] - X[..., None, :]).abs()                                   # (B, 6, n, n)
    X[:, :, torch.arange(X.shape[2]), torch.arange(X.shape[2])] = 1.0
    X = X.permute(0, 2, 1, 3)                                                       # (B, n, 6, n)
    X[~mask] = 1.0
    X = X.min(-1).values.min(-1).values
    X = X.masked_fill(X.eq(1.0), 0.0)
    return (-torch.log(1 - X)).sum(-1) / mask.float().sum(-1)


def test_alignment_agrees_with_layoutganpp_code_on_real_layouts():
    te = gl.load_data("publaynet")["test"]
    for n in (1, 2, 5, 12):  # unpadded batches of n-element test layouts
        idx = np.nonzero(te["n"] == n)[0][:50]
        b, l = te["boxes"][idx, :n], te["labels"][idx, :n]
        ref = _layoutganpp_alignment(torch.as_tensor(b, dtype=torch.float64),
                                     torch.ones(len(idx), n, dtype=torch.bool))
        np.testing.assert_allclose(gl.alignment(b, l), ref.numpy(), rtol=0, atol=1e-9)


def test_overlap_matches_hand_computed_values():
    # A (0, 0, .4, .4) area .16, B (.2, .2, .6, .5) area .12, intersection .2 x .2 = .04:
    # ordered pairs .04/.16 + .04/.12, divided by the 2 elements
    A, B, C = (0.0, 0.0, 0.4, 0.4), (0.2, 0.2, 0.6, 0.5), (0.7, 0.7, 0.9, 0.9)
    two = (0.04 / 0.16 + 0.04 / 0.12) / 2
    assert gl.overlap(*_layout([A, B]))[0] == pytest.approx(two, abs=1e-12)
    # C adds an element, no area
    assert gl.overlap(*_layout([A, B, C]))[0] == pytest.approx(two * 2 / 3, abs=1e-12)
    assert (gl.overlap(*_layout([A, B], pad_boxes=[A, (0.1, 0.1, 0.3, 0.3)]))[0]
            == pytest.approx(two, abs=1e-12))
    assert gl.overlap(*_layout([A]))[0] == 0.0                                            # one element
    assert gl.overlap(*_layout([A, (0.4, 0.0, 0.8, 0.4)]))[0] == 0.0                      # touching edges
    # identical: 2 x 1 / 2
    assert gl.overlap(*_layout([A, A]))[0] == pytest.approx(1.0, abs=1e-12)
    # B inside A entirely: B/B = 1 plus B/A = .01/.16, over 2 elements
    assert (gl.overlap(*_layout([A, (0.1, 0.1, 0.2, 0.2)]))[0]
            == pytest.approx((1 + 0.01 / 0.16) / 2, abs=1e-12))
    # a zero-area element contributes nothing as i (LayoutGAN++'s nan_to_num) and nothing as j
    assert gl.overlap(*_layout([A, (0.1, 0.1, 0.1, 0.3)]))[0] == 0.0


# -- data ----------------------------------------------------------------------------------------------------

def test_shipped_files_parse_to_the_documented_counts():
    d = gl.load_data("publaynet")
    assert (len(d["train"]["n"]), len(d["test"]["n"])) == (16_390, 10_998)
    assert d["test"]["n"].min() == 1 and d["test"]["n"].max() == 20
    # first training line: "title 10 17 103 25 | text 49 28 64 29 | ..." with corners floor(v * 127)
    np.testing.assert_allclose(d["train"]["boxes"][0, 0], [56.5 / 127, 21 / 127, 93 / 127, 8 / 127],
                               atol=1e-6)
    assert d["train"]["labels"][0, :2].tolist() == [1, 0]
    for split in d.values():
        real = split["labels"] >= 0
        assert np.array_equal(real, np.arange(gl.MAX_N)[None] < split["n"][:, None])  # real elements first
        ltrb = gl.to_ltrb(split["boxes"][real])
        assert ltrb.min() >= 0 and ltrb.max() <= 1 + 1e-6 and np.all(split["boxes"][~real] == 0)
    r = gl.load_data("rico")
    assert (len(r["train"]["n"]), len(r["test"]["n"])) == (1_865, 3_729) and r["test"]["labels"].max() == 24


def test_coco_loader_on_the_official_pages(tmp_path):
    path = os.path.join(ROOT, "data", "publaynet", "samples.json")
    d = layouts.load_coco(path)
    # 20 portrait pages, no invalid box; the page with 26 elements is over LayoutDM's 25 and is dropped
    assert len(d["n"]) == 19 and sorted(d["n"].tolist()) == sorted([12, 5, 10, 6, 12, 8, 8, 8, 13, 8, 7, 14,
                                                                     6, 8, 14, 6, 12, 2, 8])
    real = d["labels"] >= 0
    assert d["boxes"][real].min() > 0 and d["boxes"][real].max() <= 1
    ltrb = gl.to_ltrb(d["boxes"][real])
    assert ltrb.min() >= -1e-6 and ltrb.max() <= 1 + 1e-6
    # centre format divided by the page size, pages in image-id order, elements in annotation order
    with open(path) as f:
        coco = json.load(f)
    im = min(coco["images"], key=lambda i: i["id"])
    anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
    x, y, w, h = anns[0]["bbox"]
    np.testing.assert_allclose(d["boxes"][0, 0], [(x + w / 2) / im["width"], (y + h / 2) / im["height"],
                                                  w / im["width"], h / im["height"]], rtol=1e-6)
    assert d["labels"][0, 0] == anns[0]["category_id"] - 1 and d["n"][0] == len(anns)

    # LayoutDM's filters: a landscape page goes, boxes outside the page or of zero size go
    bad = json.loads(json.dumps(coco))
    bad["images"][0]["width"], bad["images"][0]["height"] = 900, 600           # landscape
    first_kept = sorted(bad["images"][1:], key=lambda i: i["id"])[0]
    its = [a for a in bad["annotations"] if a["image_id"] == first_kept["id"]]
    its[0]["bbox"] = [-1.0, 10.0, 50.0, 50.0]                                  # outside the page
    its[1]["bbox"] = [10.0, 10.0, 0.0, 50.0]                                   # zero width
    its[2]["bbox"] = [10.0, 10.0, first_kept["width"], 50.0]                   # right edge past the page
    with open(tmp_path / "train.json", "w") as f:
        json.dump(bad, f)
    d2 = layouts.load_coco(str(tmp_path / "train.json"))
    n_first = len([a for a in coco["annotations"] if a["image_id"] == bad["images"][0]["id"]])
    assert len(d2["n"]) == 19 - (n_first <= 25)
    assert len(its) - 3 in d2["n"].tolist()
    # --data: LayoutDM's split, the first 95% of train.json under torch seed 0; val.json is the test set
    with open(tmp_path / "val.json", "w") as f:
        json.dump(coco, f)
    split = gl.load_data("publaynet", str(tmp_path))
    assert len(split["train"]["n"]) == int(len(d2["n"]) * 0.95) and len(split["test"]["n"]) == 19


def test_bad_data_gives_one_line_error(tmp_path):
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        gl.load_data("publaynet", str(tmp_path))
    assert str(e.value.code).startswith("graft_layout: ") and "\n" not in str(e.value.code)
    (tmp_path / "bad.txt").write_text("text 1 2 3 4 | nosuch 1 2 3 4\n")
    with pytest.raises(SystemExit) as e:
        layouts.read_layout_text(str(tmp_path / "bad.txt"), gl.CLASSES["publaynet"])
    assert "bad.txt:1" in str(e.value.code)


# -- model and sampler ---------------------------------------------------------------------------------------

def _tiny_net(seed=0):
    torch.manual_seed(seed)
    net = gl.build_model(CFG_TINY).double().eval()
    with torch.no_grad():  # adaLN-zero starts at zero output; randomise so the checks below can fail
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def test_denoiser_is_permutation_equivariant():
    net = _tiny_net()
    g = torch.Generator().manual_seed(1)
    B, n = 3, 7
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 5:], mask[2, 2:] = False, False
    z = torch.randn(B, n, net.D, generator=g, dtype=torch.float64) * mask[..., None]
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        out = net(z, t, mask)
        assert out.abs().max() > 0.1 and torch.all(out[~mask] == 0)
        z2 = z.clone()
        # the output depends on the other elements
        z2[0, 0] += 0.5
        assert (net(z2, t, mask)[0, 1:] - out[0, 1:]).abs().max() > 1e-3
        perm = [torch.randperm(7, generator=g),
                torch.cat([torch.randperm(5, generator=g), torch.arange(5, 7)]),
                torch.tensor([1, 0, 2, 3, 4, 5, 6])]
        zp = torch.stack([z[b, perm[b]] for b in range(B)])
        torch.testing.assert_close(net(zp, t, mask), torch.stack([out[b, perm[b]] for b in range(B)]),
                                   atol=1e-5, rtol=0)
        # padding anywhere (not only at the end), permuted along with the elements, and junk in it: ignored
        perm_all = [torch.randperm(7, generator=g) for _ in range(B)]
        zq = torch.stack([z[b, perm_all[b]] for b in range(B)])
        mq = torch.stack([mask[b, perm_all[b]] for b in range(B)])
        zq[~mq] = torch.randn(int((~mq).sum()), net.D, generator=g, dtype=torch.float64)
        torch.testing.assert_close(net(zq, t, mq), torch.stack([out[b, perm_all[b]] for b in range(B)]),
                                   atol=1e-5, rtol=0)


class _Recorder(nn.Module):
    """Wraps a network and records the integer time steps it is called at and the states it sees."""

    def __init__(self, net, T):
        super().__init__()
        self.net, self.D, self.T, self.calls, self.inputs = net, net.D, T, [], []

    def forward(self, z, t, mask):
        self.calls.append(int(round(float(t[0]) * self.T)))
        self.inputs.append(z.clone())
        return self.net(z, t, mask)


def test_stitched_sampler_switches_at_s():
    torch.manual_seed(0)
    abar = gl.make_abar(CFG_TINY)
    T, N, N_I = CFG_TINY["T"], 10, 4
    tau = common.time_grid(T, N).tolist()
    s = tau[N_I]
    rec_hi, rec_lo = _Recorder(_tiny_net(1).float(), T), _Recorder(_tiny_net(2).float(), T)
    n_elem = np.array([3, 7, 1, 5, 2])
    res = gl.sample(rec_hi, rec_lo, n_elem, abar, N, N_I, batch=5, grid=128)
    # N - N_I steps above s
    assert rec_hi.calls == tau[N_I + 1:][::-1] and all(t > s for t in rec_hi.calls)
    assert rec_lo.calls == tau[1:N_I + 1][::-1] + [0] and all(t <= s for t in rec_lo.calls)  # the rest + x0
    # the saved x_s is the state net_lo starts from
    torch.testing.assert_close(res["x_s"][np.argsort(n_elem, kind="stable")][:, :7], rec_lo.inputs[0])
    assert res["x_s"].shape == (5, gl.MAX_N, 9)
    # output: results back in input order, element counts kept, corners on the 128 grid, inside the page
    assert np.array_equal((res["labels"] >= 0).sum(1), n_elem)
    ltrb = gl.to_ltrb(res["boxes"][res["labels"] >= 0].astype(np.float64))
    np.testing.assert_allclose(ltrb * 127, np.round(ltrb * 127), atol=1e-4)
    assert ltrb.min() >= 0 and ltrb.max() <= 1
    # continuing from x_s: only the steps below N_I and the x_0-prediction, all by the given network
    rec_hi.calls, rec_lo.calls = [], []
    cont = gl.continue_from(rec_lo, res["x_s"], n_elem, abar, N, N_I, batch=5, grid=128)
    assert rec_hi.calls == [] and rec_lo.calls == tau[1:N_I + 1][::-1] + [0]
    assert np.array_equal((cont["labels"] >= 0).sum(1), n_elem)
    # DDPO's trajectories: N + 1 states, zero on padding, the state at step N_I is where x_s is saved;
    # the last step (std 0) has log-prob 0
    rec_hi.calls = []
    torch.manual_seed(5)
    x_s = gl.sample(rec_hi, rec_lo, n_elem, abar, N, N_I, batch=5)["x_s"]
    torch.manual_seed(5)
    tr = gl.sample_trajectories(rec_hi, n_elem, abar, N, batch=5)
    assert tr["traj"].shape == (5, N + 1, gl.MAX_N, 9) and tr["logp"].shape == (5, N)
    torch.testing.assert_close(tr["traj"][:, N - N_I], x_s, rtol=0, atol=0)
    real = torch.arange(gl.MAX_N)[None] < torch.as_tensor(n_elem)[:, None]
    assert torch.all(tr["traj"][~real[:, None].expand(5, N + 1, gl.MAX_N)] == 0)
    assert torch.isfinite(tr["logp"]).all() and torch.all(tr["logp"][:, -1] == 0)
    # two batches call each network once per batch and step; N_I = 0 is the fine-tuned model alone
    rec_hi.calls, rec_lo.calls = [], []
    gl.sample(rec_hi, rec_lo, n_elem, abar, N, N_I, batch=3)
    assert len(rec_hi.calls) == 2 * (N - N_I) and len(rec_lo.calls) == 2 * (N_I + 1)
    rec_hi.calls, rec_lo.calls = [], []
    gl.sample(rec_hi, rec_lo, n_elem, abar, N, 0, batch=5)
    assert len(rec_hi.calls) == N and rec_lo.calls == [0]


def test_shaped_loss_reduces_to_ddpm_loss_at_abar_s_1():
    net = _tiny_net().float()
    abar = gl.make_abar(CFG_TINY)
    z0, mask = gl.to_features(*[a[:8] for a in (gl.load_data("publaynet")["test"][k]
                                                for k in ("boxes", "labels"))], 5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = gl.shaped_loss(net, z0, mask, abar, 1, 1000, 1.0, gen=g1)
    # by hand: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, loss = |eps_theta - eps|^2 over the real entries
    t = torch.randint(1, 1001, (8,), generator=g2)
    eps = torch.randn(z0.shape, generator=g2) * mask[..., None]
    x_t = abar[t].sqrt().view(8, 1, 1) * z0 + (1 - abar[t]).sqrt().view(8, 1, 1) * eps
    err = ((net(x_t, t.float() / 1000, mask) - eps) ** 2 * mask[..., None]).sum((1, 2)) / (mask.sum(1) * 9)
    assert a.item() == pytest.approx(err.mean().item(), rel=1e-6)


def test_sampler_step_is_the_ddpm_posterior_with_clipped_x0():
    abar = gl.make_abar(CFG_TINY)
    g = torch.Generator().manual_seed(0)
    for t, s in [(1000, 950), (500, 250), (10, 0), (300, 299)]:
        x0 = torch.rand(4, 3, 9, generator=g) * 1.8 - 0.9                       # inside [-1, 1]
        eps = torch.randn(4, 3, 9, generator=g)
        z_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        mean, std = gl.step_mean_std(eps, z_t, abar, t, s)
        # the eps form of the same mean (EDM's sample_p_zs_given_zt) and DDPM's posterior variance
        a_ts, s2 = (abar[t] / abar[s]).sqrt(), 1 - abar[t] / abar[s]
        torch.testing.assert_close(mean, z_t / a_ts - s2 / a_ts / (1 - abar[t]).sqrt() * eps,
                                   atol=2e-4, rtol=1e-4)
        assert float(std) == pytest.approx(float((s2 * (1 - abar[s]) / (1 - abar[t])).sqrt()), rel=1e-5)
        # the exact x_0 and eps are kept
        torch.testing.assert_close(mean, abar[s].sqrt() * x0 + (1 - abar[s] - std ** 2).sqrt() * eps,
                                   atol=2e-4, rtol=1e-4)
    # a wild eps prediction at t = T: the predicted x_0 is clipped, so the mean stays near the data range
    z_t = torch.randn(4, 3, 9, generator=g)
    mean, _ = gl.step_mean_std(z_t + 0.5, z_t, abar, 1000, 950)
    assert mean.abs().max() <= abar[950].sqrt() + 0.1 * z_t.abs().max()
    assert float(gl.step_mean_std(z_t, z_t, abar, 10, 0)[1]) == 0.0          # the last step is deterministic


# -- one GRAFT round's training: --ft_ema ------------------------------------------------------------------

class _TinyEps(torch.nn.Module):
    """eps(z, t, mask) for graft_layout.train_on_accepted: a linear map of z plus a linear function of t."""

    def __init__(self):
        super().__init__()
        self.lin, self.tw = torch.nn.Linear(3, 3), torch.nn.Parameter(torch.zeros(3))

    def forward(self, z, t, mask):
        return (self.lin(z) + t[:, None, None] * self.tw) * mask[..., None]


@pytest.mark.parametrize("decay", [0.0, 0.7])
def test_train_on_accepted_ends_on_the_ema_of_its_iterates(decay):
    """ft_ema: the round's final weights are the EMA (from the round's first weights) of the Adam iterates
    that the same seeded run without averaging passes through; decay 0 is that run itself."""
    x, n = torch.randn(6, 4, 3), np.array([4, 3, 2, 4, 1, 2])
    abar = torch.tensor(common.noise_schedule("cosine", 50), dtype=torch.float32)
    net = _TinyEps()
    torch.manual_seed(1)
    net.lin.weight.data.normal_()
    raw, avg = _TinyEps(), _TinyEps()
    raw.load_state_dict(net.state_dict()), avg.load_state_dict(net.state_dict())
    opt_raw, opt_avg = (torch.optim.Adam(raw.parameters(), lr=0.05),
                        torch.optim.Adam(avg.parameters(), lr=0.05))
    torch.manual_seed(2)
    expected, iterates = [p.detach().clone() for p in net.parameters()], []
    args = SimpleNamespace(N=10, N_I=0, rp=False, ft_steps=1, batch_size=5, amp=False, ft_ema=0.0)  # GRAFT
    for _ in range(4):  # one step per call draws the same random numbers as four steps in one call
        gl.train_on_accepted(raw, opt_raw, x, n, abar, args)
        iterates.append([p.detach().clone() for p in raw.parameters()])
        expected = [e + (1 - decay) * (p - e) for e, p in zip(expected, iterates[-1])]
    torch.manual_seed(2)
    args.ft_steps, args.ft_ema = 4, decay
    assert gl.train_on_accepted(avg, opt_avg, x, n, abar, args) == 20
    for got, want, last in zip(avg.parameters(), expected, iterates[-1]):
        torch.testing.assert_close(got.detach(), want)
        assert (decay == 0) == torch.equal(got.detach(), last)   # averaging really moved the weights


# -- FID -----------------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    g = np.random.RandomState(0)
    f = g.randn(500, 6)
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    assert abs(common.frechet_distance(mu, cov, mu, cov)) < 1e-8
    # diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2, s1, s2 = g.randn(4), g.randn(4), g.rand(4) + 0.1, g.rand(4) + 0.1
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert common.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expect, rel=1e-9)
    # a full covariance against the identity: Tr(S + I - 2 S^(1/2)), S^(1/2) from the eigendecomposition
    A = g.randn(4, 4)
    S = A @ A.T + 0.1 * np.eye(4)
    w, V = np.linalg.eigh(S)
    expect = np.trace(S) + 4 - 2 * np.trace(V @ np.diag(np.sqrt(w)) @ V.T)
    assert common.frechet_distance(np.zeros(4), S, np.zeros(4), np.eye(4)) == pytest.approx(expect, rel=1e-9)


def test_layout_fid_is_zero_on_the_test_set_itself(tmp_path):
    te = gl.load_data("publaynet")["test"]
    te = {k: v[:600] for k, v in te.items()}
    torch.manual_seed(0)
    path = str(tmp_path / "fid.pt")
    common.save_checkpoint(path, {"model": layouts.LayoutNet(5).state_dict()}, {"name": layouts.FID_NET_NAME})
    fid = gl.LayoutFID(gl.fid_network(path, None, 5, 0), 5, te, path)
    assert abs(fid(te["boxes"], te["labels"])) < 1e-6
    # order of layouts: no effect
    shuffled = np.random.RandomState(0).permutation(len(te["n"]))
    assert abs(fid(te["boxes"][shuffled], te["labels"][shuffled])) < 1e-6
    assert fid(te["boxes"][:300], np.where(te["labels"][:300] >= 0, 4, -1)) > 1.0   # every element a figure
    assert fid.info["name"] == layouts.FID_NET_NAME and "not comparable" in fid.info["note"]


def test_rewards_are_plain_functions_and_bad_rewards_stop_the_run():
    b, l = _layout(THREE)
    A, B = (0.0, 0.0, 0.4, 0.4), (0.2, 0.2, 0.6, 0.5)
    b2, l2 = _layout([A, B])
    boxes, labels = np.concatenate([b, b2]), np.concatenate([l, l2])
    r = {k: gl.score({"boxes": boxes, "labels": labels}, f) for k, f in gl.REWARDS.items()}
    torch.testing.assert_close(r["overlap"], torch.tensor([0.0, -(0.04 / 0.16 + 0.04 / 0.12) / 2]))
    torch.testing.assert_close(r["alignment_overlap"], r["alignment"] + r["overlap"])
    for bad, what in [(lambda b, l: np.full(len(b), np.nan), "NaN"),
                      (lambda b, l: np.zeros((len(b), 2)), "shape")]:
        with pytest.raises(SystemExit, match=what):
            gl.score({"boxes": boxes, "labels": labels}, bad)


# -- command line --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--n_i", "1.0"], ["--n_i", "-0.1"], ["--K", "0"],
                                  ["--M", "10", "--K", "11"], ["--reward", "nosuch"], ["--N", "2000"],
                                  ["--rp"], ["--accept", "threshold"], ["--dataset", "rico", "--data", "x"],
                                  ["--d_model", "30", "--n_heads", "4"], ["--grid", "1"],
                                  ["--algo", "nosuch"], ["--stratify", "--accept", "best_of_n"],
                                  ["--ft_ema", "1"], ["--ft_ema", "-0.5"]])
def test_bad_flags_exit_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gl.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_flag_from_the_shell_is_one_line_and_exit_2():
    p = subprocess.run([sys.executable, "graft_layout.py", "--n_i", "1.5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--n_i must be in [0, 1)" in p.stderr


def test_good_flags_parse_with_derived_quantities():
    args = gl.parse_args(["--n_i", "0.25"])
    assert args.N_I == 25 and args.reward == "alignment" and args.grid == 128 and args.dedup
    assert args.ref.endswith(os.path.join("checkpoints", "layout_publaynet_cpu.pt"))
    args = gl.parse_args(["--data", "somewhere", "--preset", "paper"])
    assert args.grid == 0 and args.N == 1000 and args.fid_net.endswith("layout_fidnet_publaynet_full.pt")


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_dataset"])
def test_bad_ref_gives_one_line_error(tmp_path, case):
    ref = str(tmp_path / f"{case}.pt")
    if case == "corrupt":
        open(ref, "wb").write(b"not a checkpoint")
    if case == "other_dataset":
        common.save_checkpoint(ref, {"model": gl.build_model(dict(CFG_TINY, n_classes=25)).state_dict()},
                               {"model": dict(CFG_TINY, n_classes=25, dataset="rico")})
    p = subprocess.run([sys.executable, "graft_layout.py", "--eval_only", "--ref", ref,
                        "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err and "\n" not in err, err
    assert err.startswith("graft_layout: ") and os.path.basename(ref) in err


def test_tiny_end_to_end_run_writes_results_and_resumes(tmp_path):
    base = ["--d_model", "32", "--n_layers", "1", "--n_heads", "2"]
    gl.main(["--pretrain", *base, "--train_steps", "20", "--batch_size", "16",
             "--out", str(tmp_path / "pre")])
    run = ["--ref", str(tmp_path / "pre" / "ref.pt"), "--N", "4", "--M", "12", "--K", "3", "--rounds", "2",
           "--n_eval", "12", "--ft_steps", "2", "--batch_size", "4", "--fid_net", str(tmp_path / "fid.pt"),
           "--fid_steps", "3", "--cache_dir", str(tmp_path / "cache"), "--n_i", "0.5",
           "--out", str(tmp_path / "pg")]
    res = gl.main(run)
    assert res["method"] == "pgraft" and res["config"]["N_I"] == 2
    assert set(res) >= {"task", "method", "n_i", "command", "config", "reference", "finetuned", "compute",
                        "rounds", "real_test", "fid_net"}
    for part in ("reference", "finetuned", "real_test"):
        assert {"alignment_x100", "overlap", "fid"} <= set(res[part]["metrics"])
    assert res["compute"]["samples"] == 24 and res["compute"]["nfe_sampling"] == 24 * 5
    assert res["compute"]["grad_calls"] == 2 * 2 * 4
    lines = (tmp_path / "pg" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    for png in ("layouts_reference.png", "layouts_finetuned.png"):
        assert (tmp_path / "pg" / png).stat().st_size > 1000
    # a second call resumes: no new round, the same fine-tuned numbers, the reference from the cache
    again = gl.main(run)
    assert again["rounds"] == res["rounds"] and again["finetuned"]["metrics"] == res["finetuned"]["metrics"]
    with pytest.raises(SystemExit, match="other settings"):
        gl.main([*run[:-2], "--out", str(tmp_path / "pg"), "--K", "4"])
