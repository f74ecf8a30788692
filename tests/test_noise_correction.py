"""Tests of noise_correction.py and image_features.py: backward-Euler inversion (docs/method.md §5), the
corrector, FID (docs/method.md §6), FLOPs, data, CLI errors."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import image_features as imf
import noise_correction as nc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(in_ch=1, image_size=16, ch=8, ch_mult=[1, 2], n_res=1, attn_res=[8], gauss_skip=False)


class LinearField(nn.Module):
    """v(x, t) = A x + b t on flattened pixels: its Euler steps are affine maps with an analytic inverse."""

    gauss_skip = False

    def __init__(self, A, b, shape):
        super().__init__()
        self.A, self.b, self.shape = A, b, shape

    def forward(self, x, t):
        flat = x.flatten(1) @ self.A.T + t[:, None].to(x.dtype) * self.b
        return flat.view(-1, *self.shape)


def _linear_field(D=12, scale=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = scale * A / torch.linalg.eigvals(A).abs().max()              # spectral radius = scale
    return LinearField(A, torch.randn(D, generator=g, dtype=torch.float64), (1, 3, 4))


def _random_unet(cfg=TINY, seed=0, out_std=0.02):
    """A UNet whose zero-initialised output layer is made random, so that v is a non-trivial function."""
    torch.manual_seed(seed)
    net = nc.build_model(cfg)
    nn.init.normal_(net.out[-1].weight, std=out_std)
    return net.eval().requires_grad_(False)


def _analytic_preimage(net, x, N):
    """Backward Euler through a linear field: for j = N-1 .. 0, (I + h A) z = y - h (j h) b.
    Returns (B, D)."""
    h, y = 1 / N, x.flatten(1).T
    I = torch.eye(len(net.A), dtype=torch.float64)
    for j in reversed(range(N)):
        y = torch.linalg.solve(I + h * net.A, y - h * (j * h) * net.b[:, None])
    return y.T


# -- inversion through the deployed sampler (docs/method.md §5) ----------------------------------------------

@pytest.mark.parametrize("anderson", [0, 5])
def test_inversion_of_linear_field_equals_analytic_preimage(anderson):
    N = 5
    net = _linear_field(scale=1.5)                                    # h L = 0.3 < 1
    x = torch.randn(4, 1, 3, 4, dtype=torch.float64)
    z, worst, iters, _ = nc.invert(net, x, N, n_b=200, tol=1e-13, anderson=anderson)
    torch.testing.assert_close(z.flatten(1), _analytic_preimage(net, x, N), rtol=0, atol=1e-11)
    assert worst.max() <= 1e-13 and iters.max() < 200
    torch.testing.assert_close(nc.flow_sample(net, z, N), x, rtol=0, atol=1e-11)   # T(inverse(x)) = x


@pytest.mark.parametrize("anderson", [0, 3])
def test_each_sample_is_inverted_as_if_alone_in_its_batch(anderson):
    # a sample far from the fixed point needs more iterations than one near it; the converged one must stop,
    # so a sample's inverse noise does not depend on its batch mates (batch-wide iteration failed this)
    net = _linear_field(scale=3.0)                                    # h L = 0.75: slow enough to differ
    x = torch.randn(3, 1, 3, 4, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 30.0]).view(3, 1, 1, 1)
    z, worst, iters, _ = nc.invert(net, x, 4, n_b=200, tol=1e-6, anderson=anderson)
    alone = torch.cat([nc.invert(net, x[i:i + 1], 4, n_b=200, tol=1e-6, anderson=anderson)[0]
                       for i in range(3)])
    torch.testing.assert_close(z, alone, rtol=0, atol=1e-10)                 # BLAS rounding only
    assert worst.max() <= 1e-6


def test_inversion_reports_non_convergence_when_hL_exceeds_one():
    N = 4
    net = _linear_field(scale=6.0)                             # h L = 1.5: the fixed point iteration diverges
    x = torch.randn(3, 1, 3, 4, dtype=torch.float64)
    _, worst, iters, _ = nc.invert(net, x, N, n_b=20, tol=1e-8, anderson=0)
    assert iters.max() == 20 and not (worst.max() < 1e-2), "a diverging solve must be reported, not hidden"


def test_anderson_mixing_converges_where_the_plain_iteration_diverges():
    N = 4
    net = _linear_field(scale=6.0)                                    # h L = 1.5
    x = torch.randn(3, 1, 3, 4, dtype=torch.float64)
    # memory >= D: exact on a linear map
    z, worst, _, _ = nc.invert(net, x, N, n_b=100, tol=1e-10, anderson=12)
    assert worst.max() <= 1e-10
    # |z| ~ 20: the tolerance allows for the conditioning of (I + h A) at h L = 1.5
    torch.testing.assert_close(z.flatten(1), _analytic_preimage(net, x, N), rtol=1e-7, atol=1e-8)


def test_power_iteration_recovers_spectral_radius():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    eig = torch.tensor([3.0, -2.0, 1.5] + [0.5] * 9, dtype=torch.float64)
    net = LinearField(Q @ torch.diag(eig) @ Q.T, torch.zeros(12, dtype=torch.float64), (1, 3, 4))
    lam = nc.step_lipschitz(net, torch.randn(2, 1, 3, 4, dtype=torch.float64), torch.zeros(2), iters=60)
    torch.testing.assert_close(lam, torch.full((2,), 3.0, dtype=torch.float64), rtol=1e-4, atol=0)


def test_unet_round_trip_returns_x_with_small_residual():
    N, tol = 8, 1e-6
    net = _random_unet()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    rep = nc.inversion_report(net, x, N, n_b=50, tol=tol)
    assert 0 < rep["hL_max"] < 1, rep["hL_max"]                     # the regime where the iteration contracts
    assert rep["residual_rms_max"] <= tol
    assert rep["roundtrip_rms_max"] < 1e-5 and rep["roundtrip_abs_max"] < 1e-4, rep
    assert len(rep["hL_per_step"]) == len(rep["iterations_per_step"]) == N
    z = nc.invert(net, x, N, 50, tol)[0]
    assert (z - x).abs().max() > 1e-2, "the preimage must differ from x: v is not trivial"


def test_shipped_base_round_trip_is_within_one_grey_level():
    # the acceptance's "on the real base model, T(inverse(x)) returns x": images the N-step sampler made have
    # an exact preimage; in the last step h v(z) = E[x_1 | z] - z stalls the plain iteration (round trip RMS
    # up to 0.56 measured), Anderson mixing with the cpu preset's n_b and tol brings it under one grey level
    # (2/255)
    net = nc.load_flow(nc.DEFAULT_REF, "cpu", "base")[0]
    args = nc.parse_args([])
    torch.manual_seed(0)
    x = nc.flow_sample(net, torch.randn(8, 1, 32, 32), args.N)                     # (8, 1, 32, 32) in [-1, 1]
    z, worst, _, _ = nc.invert(net, x, args.N, args.n_b, args.tol, args.anderson)
    back = nc.flow_sample(net, z, args.N)
    assert worst.max() < 1e-2 and nc.rms(back - x).max() < 2 / 255, (worst.max(), nc.rms(back - x).max())
    assert (back - x).abs().max() < 0.1                                      # no pixel off by 5% of the range


# -- the corrector -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_corrector_has_about_a_quarter_of_the_base_parameters(preset, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    args = nc.parse_args(["--preset", preset] + (["--data", ROOT, "--inception", str(tmp_path / "w.pth")]
                                                 if preset == "paper" else []))
    cfg = nc.model_config(args, 1 if preset == "cpu" else 3)
    base, corr = nc.build_model(cfg), nc.build_model(nc.corrector_config(cfg, args.corrector_width, False))
    ratio = nc.n_params(corr) / nc.n_params(base)
    print(f"{preset}: base {nc.n_params(base):,}, corrector {nc.n_params(corr):,}, ratio {ratio:.3f}")
    assert 0.2 <= ratio <= 0.3
    if preset == "paper":                                             # the paper: 65M base, 16M corrector
        assert 60e6 <= nc.n_params(base) <= 70e6 and 14e6 <= nc.n_params(corr) <= 18e6


def test_gaussian_part_of_the_corrector_is_integrated_exactly():
    cfg = nc.corrector_config(TINY, 0.5, plain=False)
    net = nc.build_model(cfg).eval()                               # zero output layer: only the Gaussian part
    g = torch.Generator().manual_seed(0)
    net.g_mu.copy_(torch.randn(1, 16, 16, generator=g))
    net.g_var.copy_(torch.rand(1, 16, 16, generator=g) * 3 + 0.1)
    xi = torch.randn(5, 1, 16, 16, generator=g, dtype=torch.float64)
    net.double()
    for N_c in (1, 3, 8):                                        # N(0, I) -> N(mu, diag s^2) exactly, any N_c
        torch.testing.assert_close(nc.flow_sample(net, xi, N_c), net.g_mu + net.g_var.sqrt() * xi,
                                   rtol=0, atol=1e-12)
    # the velocity the loss trains is the one the exact integrator follows: a fine midpoint rule on it agrees
    net.forward = lambda x, t: torch.zeros_like(x)           # the UNet's output is zero anyway; skip it
    x, n = xi.clone(), 400
    v = lambda x, t: nc.velocity(net, x, torch.full((5,), t, dtype=torch.float64))
    for j in range(n):
        x = x + v(x + v(x, j / n) / (2 * n), (j + 0.5) / n) / n
    torch.testing.assert_close(x, net.g_mu + net.g_var.sqrt() * xi, rtol=0, atol=1e-4)


# -- FID (docs/method.md §6) ---------------------------------------------------------------------------------

def _psd_sqrt(S):
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def _closed_form_fid(mu1, S1, mu2, S2):
    r = _psd_sqrt(S1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(S1 + S2 - 2 * _psd_sqrt(r @ S2 @ r)))


def test_fid_equals_closed_form_for_two_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    S1, S2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)    # non-commuting covariances
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert common.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(_closed_form_fid(mu1, S1, mu2, S2),
                                                                      rel=1e-8)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])  # diagonal: |dmu|^2 + sum (sqrt a - sqrt b)^2
    assert common.frechet_distance(np.zeros(3), np.diag(a), np.ones(3),
                                   np.diag(b)) == pytest.approx(3 + 1 + 1, abs=1e-9)
    assert common.frechet_distance(mu1, S1, mu1, S1) == pytest.approx(0, abs=1e-6)
    # from samples: the estimate converges to the closed form
    L1, L2 = np.linalg.cholesky(S1), np.linalg.cholesky(S2)
    x, y = mu1 + rng.normal(size=(200_000, d)) @ L1.T, mu2 + rng.normal(size=(200_000, d)) @ L2.T
    est = common.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert est == pytest.approx(_closed_form_fid(mu1, S1, mu2, S2), rel=0.02)


def test_fid_of_singular_covariances_is_finite():
    x = np.random.default_rng(0).normal(size=(5, 20))                # fewer samples than features
    mu, S = x.mean(0), np.cov(x, rowvar=False)
    assert (np.isfinite(common.frechet_distance(mu, S, mu + 1, S))
            and common.frechet_distance(mu, S, mu + 1, S) > 19)


def _fake_pt_inception(path):
    """pytorch-fid's layout (torchvision names, 1008 classes, no aux head), random weights, calibrated BN."""
    from torchvision.models import inception as tvi
    torch.manual_seed(0)
    net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299) * 2 - 1)               # O(1) activations everywhere
    torch.save(net.eval().state_dict(), path)
    return net.state_dict()


def test_inception_loader_takes_pytorch_fid_weights_with_fid_pooling(tmp_path):
    path = str(tmp_path / "pt_inception.pth")
    _fake_pt_inception(path)
    feat = imf.load_inception(path)
    x = torch.rand(2, 1, 32, 32) * 2 - 1                             # grey images at any size
    f = feat(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    # the pooling branch is pytorch-fid's: average pooling that does not count the zero padding
    from torchvision.models import inception as tvi
    a = imf._fid_pool_block(tvi.InceptionA,
                                  lambda z: F.avg_pool2d(z, 3, 1, 1, count_include_pad=False))(192, 32).eval()
    plain = tvi.InceptionA(192, 32).eval()
    plain.load_state_dict(a.state_dict())
    z = torch.rand(1, 192, 9, 9)
    with torch.no_grad():
        ours, theirs = a(z), plain(z)
        expect = a.branch_pool(F.avg_pool2d(z, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(ours[:, :-32], theirs[:, :-32])
    torch.testing.assert_close(ours[:, -32:], expect)
    assert not torch.allclose(ours[:, -32:], theirs[:, -32:]), \
        "the border pixels must differ from torchvision's"


def test_inception_features_equal_pytorch_fid(tmp_path, monkeypatch):
    pfid = pytest.importorskip("pytorch_fid.inception")              # pip install pytorch-fid to run this one
    path = str(tmp_path / "pt_inception.pth")
    sd = _fake_pt_inception(path)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: sd)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    f = imf.load_inception(path)(x)
    with torch.no_grad():
        ref = pfid.InceptionV3([3]).eval()((x.expand(-1, 3, -1, -1) + 1) / 2)[0].flatten(1)
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-3)


def test_inception_loader_rejects_other_weights_with_one_line(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(SystemExit) as e:
        imf.load_inception(path)
    msg = str(e.value.code)
    assert msg.startswith("noise_correction: ") and "\n" not in msg and "pt_inception" in msg


# -- FLOPs ---------------------------------------------------------------------------------------------------

def test_flops_are_counted_and_linear_in_nfe():
    from torch.utils.flop_counter import FlopCounterMode
    net = _random_unet()
    per = nc.flops_per_forward(net, 1, 16, "cpu")
    assert per > 0
    counts = []
    for N in (1, 2, 5):
        with FlopCounterMode(display=False) as fc:
            nc.flow_sample(net, torch.zeros(1, 1, 16, 16), N)
        counts.append(fc.get_total_flops())
    assert counts == [per, 2 * per, 5 * per]
    conv = nn.Conv2d(3, 4, 3, padding=1)                              # 2 x MACs: 2 * 4 * 3 * 9 * 8 * 8
    with FlopCounterMode(display=False) as fc:
        conv(torch.zeros(1, 3, 8, 8))
    assert fc.get_total_flops() == 2 * 4 * 3 * 9 * 64


def test_cpu_preset_flops_and_parameters_are_the_documented_ones():
    args = nc.parse_args([])
    cfg = nc.model_config(args, 1)
    base, corr = nc.build_model(cfg), nc.build_model(nc.corrector_config(cfg, 0.5, False))
    assert nc.n_params(base) == 636_465 and nc.n_params(corr) == 160_345
    assert nc.flops_per_forward(base, 1, 32, "cpu") == pytest.approx(1.834e8, rel=1e-3)


# -- data ----------------------------------------------------------------------------------------------------

def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_layout(tmp_path, monkeypatch):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):
        _write_idx(str(raw / f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        _write_idx(str(raw / f"{split}-labels-idx1-ubyte"), rng.integers(0, 10, n))       # gzip or not
    monkeypatch.setattr(imf, "FMNIST_DIRS", (str(tmp_path / "nowhere"),))
    d = imf.load_fashion_mnist(str(tmp_path))                       # torchvision's layout under --data_root
    x, y = d["train"]
    assert x.shape == (7, 1, 32, 32) and x.dtype == torch.uint8 and y.shape == (7,) and len(d["test"][0]) == 3
    assert (x[:, :, :2] == 0).all() and (x[:, :, :, -2:] == 0).all()  # 2-pixel black border
    ref = imf.read_idx(str(raw / "train-images-idx3-ubyte.gz"))
    assert np.array_equal(x[:, 0, 2:30, 2:30].numpy(), ref)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")  # truncated
    with pytest.raises(SystemExit) as e:
        imf.load_fashion_mnist(str(tmp_path))
    assert "could not read Fashion-MNIST" in str(e.value.code) and "\n" not in str(e.value.code)


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(imf, "FMNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(SystemExit) as e:
        imf.load_fashion_mnist(str(tmp_path))
    msg = str(e.value.code)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg and "\n" not in msg


@pytest.mark.skipif(imf.find_fashion_mnist("/nonexistent") is None,
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_loads():
    d = imf.load_fashion_mnist("/nonexistent")
    assert d["train"][0].shape == (60_000, 1, 32, 32) and d["test"][0].shape == (10_000, 1, 32, 32)
    assert sorted(torch.bincount(d["test"][1]).tolist()) == [1000] * 10
    assert d["train"][0].float().mean().item() == pytest.approx(72.94 * 28 * 28 / 32 / 32, rel=0.01)


# -- end to end on tiny synthetic data -----------------------------------------------------------------------

@pytest.fixture
def tiny_data(monkeypatch):
    g = torch.Generator().manual_seed(0)
    imgs = torch.zeros(96, 1, 32, 32, dtype=torch.uint8)
    imgs[:, :, 8:24, 8:24] = torch.randint(100, 256, (96, 1, 1, 1), generator=g, dtype=torch.uint8)  # squares
    labels = torch.arange(96) % 10
    d = {"train": (imgs[:64], labels[:64]), "test": (imgs[64:], labels[64:])}
    monkeypatch.setattr(nc, "load_fashion_mnist", lambda *a, **k: d)
    return d


def _tiny_flags(tmp_path):
    return ["--ch", "8", "--ch_mult", "1,2", "--batch_size", "8", "--sample_batch", "16", "--N", "4",
            "--N_c", "2", "--classifier", str(tmp_path / "cls.pt"), "--classifier_epochs", "0.1",
            "--cache_dir", str(tmp_path / "cache")]


def test_pretrain_resumes_and_main_writes_matched_flops_comparison(tiny_data, tmp_path):
    pre = tmp_path / "pre"
    nc.main(["--pretrain", "--train_steps", "3", "--out", str(pre)] + _tiny_flags(tmp_path))
    assert common.load_checkpoint(str(pre / "ref.pt"))["extra"]["step"] == 3
    nc.main(["--pretrain", "--train_steps", "5", "--out", str(pre)] + _tiny_flags(tmp_path))
    assert common.load_checkpoint(str(pre / "ref.pt"))["extra"]["step"] == 5
    slim = common.load_checkpoint(str(pre / "ref_ema.pt"))                 # what to ship: EMA weights only
    assert set(slim["state_dicts"]) == {"ema"} and (pre / "samples.png").exists()
    out = tmp_path / "run"
    res = nc.main(["--ref", str(pre / "ref.pt"), "--out", str(out), "--n_invert", "20",
                   "--corrector_steps", "3", "--n_eval", "12", "--fid_seeds", "2", "--base_steps", "2"]
                  + _tiny_flags(tmp_path) + ["--N_c", "2,1"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["task"] == "noise_correction" and on_disk["method"] == "inverse_noise_correction"
    for k in ("reference", "finetuned", "matched", "curve", "inversion", "fid_network", "fid_reference",
              "compute"):
        assert k in on_disk, k
    f_base = res["flops_per_forward"]["base"]
    assert len(res["matched"]) == 2
    for N_c, m in zip((1, 2), res["matched"]):                             # one comparison per N_c, in order
        # N' is the smallest with >= FLOPs
        assert m["corrected"]["N_c"] == N_c and m["corrected"]["nfe"] == 4 + N_c
        assert (m["base"]["flops_per_image"] >= m["corrected"]["flops_per_image"]
                > m["base"]["flops_per_image"] - f_base)
        assert len(m["corrected"]["metrics"]["fid"]["per_seed"]) == 2
    assert res["finetuned"] == res["matched"][-1]["corrected"]
    assert ({c["N"] for c in res["curve"] if c["sampler"] == "base"}
            == {2, 4} | {m["base"]["N"] for m in res["matched"]})
    assert res["inversion"]["n_inverted"] == 20 and "hL_max" in res["inversion"]
    for png in ("fid_vs_flops.png", "samples_base_vs_corrected.png"):
        assert (out / png).stat().st_size > 1000
    assert os.path.exists(out / "corrector_N4.pt")
    # a corrector belongs to one base step count
    with pytest.raises(SystemExit) as e:
        nc.main(["--ref", str(pre / "ref.pt"), "--out", str(out), "--corrector", str(out / "corrector_N4.pt"),
                 "--corrector_steps", "3"] + _tiny_flags(tmp_path) + ["--N", "3"])
    assert "N=4" in str(e.value.code) and "N=3" in str(e.value.code)


# -- command line errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--N", "0"], ["--N_c", "-1"], ["--N_c", "4,x"], ["--N_c", ""],
                                  ["--n_b", "0"], ["--tol", "-1"], ["--sigma", "-0.1"],
                                  ["--base_steps", "4,x"], ["--base_steps", "0"], ["--ch_mult", ""],
                                  ["--n_eval", "1"], ["--corrector_width", "0"], ["--image_size", "28"],
                                  ["--data", "/no/such/dir"],
                                  ["--pretrain", "--eval_only"], ["--data", "."], ["--max_minutes", "0"],
                                  ["--inception", "/no/such/file.pth"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        nc.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_arch", "default_missing"])
def test_bad_ref_gives_one_line_error(tmp_path, case):
    refs = {"missing": str(tmp_path / "nope.pt"), "corrupt": str(tmp_path / "corrupt.pt"),
            "wrong_arch": str(tmp_path / "wrong.pt")}
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    common.save_checkpoint(refs["wrong_arch"], {"ema": nc.build_model(TINY).state_dict()},
                           {"model": dict(TINY, ch=16)})
    what = {"missing": "does not exist", "corrupt": "not a readable", "wrong_arch": "does not fit",
            "default_missing": "--pretrain"}[case]
    argv = ["--eval_only", "--out", str(tmp_path / "out")] + (["--ref", refs[case]] if case in refs else [])
    if case == "default_missing" and os.path.exists(nc.DEFAULT_REF):
        pytest.skip("the default checkpoint is shipped")
    p = subprocess.run([sys.executable, "noise_correction.py", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err and "\n" not in err, err
    assert err.startswith("noise_correction: ") and what in err, err
