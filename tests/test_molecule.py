"""Tests of graft_molecule.py, part 1: data, EDM metrics, EGNN, sampler, shaped loss (docs/method.md §3),
CLI errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import graft_molecule as gm
import qm9

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_TINY = dict(nf=16, n_layers=2, attention=True, tanh=True, include_charges=True, T=1000,
                schedule="polynomial_2")


# -- data and the EDM metrics (docs/method.md §6) ------------------------------------------------------------

def test_qm9_test_set_stability_matches_edm():
    data = gm.load_qm9(gm.build_parser().get_default("data_dir"))
    assert {k: len(v["n"]) for k, v in data.items()} == {"train": 100_000, "valid": 17_748, "test": 13_083}
    te = data["test"]
    assert te["pos"].shape == (13_083, 29, 3) and te["types"].shape == (13_083, 29)
    real = te["types"] >= 0
    assert np.array_equal(real.sum(1), te["n"]) and np.all(real == (np.arange(29)[None] < te["n"][:, None]))
    com = (te["pos"] * real[..., None]).sum(1) / te["n"][:, None]
    assert np.abs(com).max() < 1e-4 and np.all(te["pos"][~real] == 0)
    # all 13,083 test molecules (about 5 s): QM9 itself is ~99.0% atom / ~95.2% molecule stable
    # (docs/method.md §6)
    mols = gm.molecules(te)
    ev = gm.evaluate(mols, set())
    atom, mol, valid = ev["atom_stable"]["mean"], ev["mol_stable"]["mean"], ev["valid"]["mean"]
    print(f"QM9 test: atom stable {atom:.4f}, molecule stable {mol:.4f}, valid {valid:.4f}")
    assert abs(atom - 0.990) <= 0.01, atom
    assert abs(mol - 0.952) <= 0.01, mol
    assert valid >= 0.95, valid


def _types(symbols):
    return np.array([qm9.ATOMS.index(a) for a in symbols])


def _pair(a, b, d):
    return qm9.bond_orders(np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]]), _types([a, b]))


# distances in Angstrom; thresholds in pm: single below B1 + 10, double below B2 + 5, triple below B3 + 3
# (H-H: 84; C-C: 164 / 139 / 123). Pairs missing from the B2 / B3 tables never get that order.
@pytest.mark.parametrize("a, b, d, order", [
    ("H", "H", 0.74, 1), ("H", "H", 0.83, 1), ("H", "H", 0.85, 0),
    ("C", "C", 1.20, 3), ("C", "C", 1.22, 3), ("C", "C", 1.24, 2), ("C", "C", 1.34, 2),
    ("C", "C", 1.38, 2), ("C", "C", 1.40, 1), ("C", "C", 1.54, 1), ("C", "C", 1.63, 1), ("C", "C", 1.65, 0),
    ("C", "N", 1.16, 3), ("C", "N", 1.29, 2), ("C", "N", 1.47, 1), ("C", "N", 1.58, 0),
    ("C", "O", 1.13, 3), ("C", "O", 1.20, 2), ("C", "O", 1.43, 1),
    ("N", "N", 1.10, 3), ("N", "N", 1.25, 2), ("N", "N", 1.45, 1),
    ("O", "O", 1.00, 2), ("N", "O", 1.00, 2), ("O", "O", 1.48, 1),
    ("C", "H", 0.90, 1), ("C", "H", 1.09, 1), ("C", "H", 1.20, 0),
    ("C", "F", 1.35, 1), ("F", "F", 1.42, 1), ("F", "F", 1.53, 0), ("H", "F", 0.92, 1),
])
def test_bond_order_follows_edm_tables(a, b, d, order):
    assert _pair(a, b, d)[0, 1] == order
    assert _pair(b, a, d)[0, 1] == order and _pair(a, b, d)[1, 0] == order  # symmetric
    assert _pair(a, b, d)[0, 0] == 0


def _tetrahedral_ch4():
    dirs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    return np.vstack([[0, 0, 0], 1.09 * dirs]), _types("CHHHH")


def test_hand_made_molecules_are_stable_with_edm_smiles():
    from rdkit import Chem
    h2 = gm.Molecule(np.array([[0, 0, 0], [0.74, 0, 0]], np.float32), _types("HH"))
    assert h2.stable and h2.bonds[0, 1] == 1 and h2.smiles == "[H][H]"

    pos, types = _tetrahedral_ch4()
    ch4 = gm.Molecule(pos, types)
    assert ch4.stable and ch4.atom_stable.all() and ch4.bonds.sum() == 8  # 4 C-H bonds, counted both ways
    # EDM's SMILES keep the explicit hydrogens (its mol2smiles never calls RemoveHs); heavy-atom form is "C"
    assert ch4.smiles == "[H]C([H])([H])[H]"
    assert Chem.MolToSmiles(Chem.RemoveHs(ch4.mol)) == "C"

    # padding (-1) is dropped; a methyl radical has an unstable carbon
    pad_pos = np.zeros((29, 3), np.float32)
    pad_types = np.full(29, -1, np.int8)
    pad_pos[:4], pad_types[:4] = pos[:4], types[:4]
    ch3 = gm.Molecule(pad_pos, pad_types)
    assert len(ch3.atoms) == 4 and not ch3.stable and ch3.atom_stable.tolist() == [False, True, True, True]

    # ethylene, ideal geometry: C=C 1.34, C-H 1.09, 120 degree angles
    ang = np.deg2rad(120)
    hx, hy = 1.09 * np.cos(np.pi - ang), 1.09 * np.sin(np.pi - ang)
    pos = np.array([[-0.67, 0, 0], [0.67, 0, 0], [-0.67 - hx, hy, 0], [-0.67 - hx, -hy, 0],
                    [0.67 + hx, hy, 0], [0.67 + hx, -hy, 0]])
    eth = gm.Molecule(pos, _types("CCHHHH"))
    assert eth.bonds[0, 1] == 2 and eth.stable
    assert Chem.MolToSmiles(Chem.RemoveHs(eth.mol)) == "C=C"

    ev = gm.evaluate([ch4, ch3, ch4], {"[H]C([H])([H])[H]"})
    assert ev["mol_stable"]["mean"] == pytest.approx(2 / 3)
    assert ev["atom_stable"]["mean"] == pytest.approx(13 / 14)
    assert ev["n_unique_valid"] == len({m.smiles for m in (ch4, ch3) if m.smiles})


# -- model: E(3) equivariance --------------------------------------------------------------------------------

def _tiny_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = gm.build_model(CFG_TINY).to(dtype)
    # EDM initialises the last coordinate layer with gain 0.001: enlarge it so positions move by O(1) and
    # the equivariance check below is not satisfied trivially by a near-zero output
    for i in range(net.egnn.n_layers):
        nn.init.normal_(getattr(net.egnn, f"e_block_{i}").gcl_equiv.coord_mlp[-1].weight, std=0.3)
    return net


def _rotation(gen, proper):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q if proper else q @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def test_egnn_is_e3_equivariant():
    net = _tiny_net()
    g = torch.Generator().manual_seed(1)
    B, n = 2, 6
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 4:] = False                                                     # molecule 1 has 2 padding atoms
    x = gm.remove_mean(1.5 * torch.randn(B, n, 3, generator=g, dtype=torch.float64), mask)
    h = torch.randn(B, n, net.h_nf, generator=g, dtype=torch.float64) * mask[..., None]
    z = torch.cat([x, h], -1)                                                # (B, n, 3+F), zero CoM
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    with torch.no_grad():
        out = net(z, t, mask)
        assert out[..., :3].abs().max() > 0.1 and out[..., 3:].abs().max() > 0.1, "output too small to test"
        assert torch.all(out[1, 4:] == 0), "padding entries of the output must be zero"
        assert gm.remove_mean(out[..., :3], mask).sub(out[..., :3]).abs().max() < 1e-12, "output has zero CoM"

        # a non-rigid change of the input must change the output (so the checks below can fail)
        z_bent = z.clone()
        z_bent[0, 0, :3] += 0.5
        z_bent[..., :3] = gm.remove_mean(z_bent[..., :3], mask)
        assert (net(z_bent, t, mask) - out).abs().max() > 1e-3

        for proper in (True, False):
            Q = _rotation(g, proper)
            assert torch.det(Q) == pytest.approx(1.0 if proper else -1.0)
            out_r = net(torch.cat([x @ Q.T, h], -1), t, mask)
            torch.testing.assert_close(out_r[..., :3], out[..., :3] @ Q.T, atol=1e-4, rtol=0)
            torch.testing.assert_close(out_r[..., 3:], out[..., 3:], atol=1e-4, rtol=0)

        # translation: the network sees only differences and re-centres its output, so even an input that
        # is not re-centred gives the same output; re-centring gives back z exactly
        shift = 3.0 * torch.randn(B, 1, 3, generator=g, dtype=torch.float64)
        out_t = net(torch.cat([(x + shift) * mask[..., None], h], -1), t, mask)
        torch.testing.assert_close(out_t, out, atol=1e-4, rtol=0)

        # permutation of the real atoms (padding stays at the end)
        perm = [torch.randperm(6, generator=g),
                torch.cat([torch.randperm(4, generator=g), torch.arange(4, 6)])]
        zp = torch.stack([z[b, perm[b]] for b in range(B)])
        out_p = net(zp, t, mask)
        torch.testing.assert_close(out_p, torch.stack([out[b, perm[b]] for b in range(B)]), atol=1e-4, rtol=0)

        # all at once: improper rotation, translation, permutation
        Q = _rotation(g, False)
        xq = (x @ Q.T + shift) * mask[..., None]
        zq = torch.stack([torch.cat([xq, h], -1)[b, perm[b]] for b in range(B)])
        out_q = net(zq, t, mask)
        expect = torch.stack([torch.cat([out[..., :3] @ Q.T, out[..., 3:]], -1)[b, perm[b]]
                              for b in range(B)])
        torch.testing.assert_close(out_q, expect, atol=1e-4, rtol=0)

        # whatever sits in the padding slots of the input is ignored
        z_junk = z.clone()
        z_junk[1, 4:] = torch.randn(2, z.shape[-1], generator=g, dtype=torch.float64)
        torch.testing.assert_close(net(z_junk, t, mask), out, atol=1e-12, rtol=0)


# -- sampler and loss with the tiny network ------------------------------------------------------------------

class _Recorder(nn.Module):
    """Wraps a network and records the integer time steps it is called at (to check the stitching)."""

    def __init__(self, net, T):
        super().__init__()
        self.net, self.h_nf, self.T, self.calls = net, net.h_nf, T, []

    def forward(self, z, t, mask):
        self.calls.append(int(round(float(t[0]) * self.T)))
        return self.net(z, t, mask)


def test_sampler_and_loss_tiny_config():
    torch.manual_seed(0)
    net_lo, net_hi = gm.build_model(CFG_TINY), gm.build_model(CFG_TINY)
    abar = gm.make_abar(CFG_TINY)
    T, N, N_I = CFG_TINY["T"], 5, 2
    n_atoms = np.array([7, 3, 9, 5, 4])
    rec_hi, rec_lo = _Recorder(net_hi, T), _Recorder(net_lo, T)
    torch.manual_seed(1)
    out = gm.sample(rec_hi, rec_lo, n_atoms, abar, N, N_I=N_I, batch=2)
    B, D = len(n_atoms), 3 + net_lo.h_nf
    pos, types = out["pos"], out["types"]
    assert pos.shape == (B, 29, 3) and types.shape == (B, 29)
    real = np.arange(29)[None] < n_atoms[:, None]                          # in the order of n_atoms
    assert np.all((types >= 0) == real) and np.all(types[~real] == -1) and types.max() <= 4
    assert np.isfinite(pos).all() and np.all(pos[~real] == 0)
    # zero CoM to float32 precision (an untrained net over 5 steps gives large coordinates: relative check)
    com = (pos * real[..., None]).sum(1) / n_atoms[:, None]
    assert np.abs(com).max() < 1e-4 * max(1.0, np.abs(pos).max() / 100)
    # stitching (docs/method.md §3): net_hi for tau_N .. tau_{N_I + 1}, net_lo below and for the final x_0
    tau = common.time_grid(T, N).tolist()
    assert set(rec_hi.calls) == set(tau[N_I + 1:]) and set(rec_lo.calls) == set(tau[1:N_I + 1]) | {0}
    assert len(rec_hi.calls) == 3 * (N - N_I) and len(rec_lo.calls) == 3 * (N_I + 1)  # 3 batches

    # DDPO's trajectories from the same seed: N + 1 states, zero on padding; x_s is the state at step N_I
    torch.manual_seed(1)
    tr = gm.sample_trajectories(rec_hi, n_atoms, abar, N, batch=2)
    traj, logp = tr["traj"], tr["logp"]
    assert traj.shape == (B, N + 1, 29, D) and logp.shape == (B, N)
    assert torch.isfinite(traj).all() and torch.isfinite(logp).all()
    real_t = torch.as_tensor(real)
    assert torch.all(traj[~real_t[:, None].expand(B, N + 1, 29)] == 0)
    x_s = out["x_s"]
    assert x_s.shape == (B, 29, D)
    assert torch.equal(x_s, traj[:, N - N_I]), "x_s is the state when the sampler reaches step N_I"
    xs_pos = x_s[..., :3]
    assert gm.remove_mean(xs_pos, real_t).sub(xs_pos).abs().max() < 1e-4 * max(1.0, xs_pos.abs().max() / 100)
    z0, m0 = gm.to_features(pos, types, True)                              # GRAFT's data: the clean molecule

    # continuing from x_s: only the steps below N_I and the x_0-prediction, all by the given network
    rec_hi.calls.clear(), rec_lo.calls.clear()
    cont = gm.continue_from(rec_lo, x_s, n_atoms, abar, N, N_I, batch=8)
    assert rec_hi.calls == [] and rec_lo.calls == tau[1:N_I + 1][::-1] + [0]
    assert np.all((cont["types"] >= 0) == real) and np.isfinite(cont["pos"]).all()

    # the training loss: finite scalar, finite gradients (GRAFT and P-GRAFT's shaped form)
    z, mask = z0, m0
    assert z.shape == (B, 9, D)
    s = tau[N_I]
    for t_lo, abar_s, data in ((1, 1.0, z), (s + 1, abar[s], x_s[:, :9])):
        net_lo.zero_grad()
        loss = gm.shaped_loss(net_lo, data, mask, abar, t_lo, T, abar_s=abar_s,
                              gen=torch.Generator().manual_seed(2))
        assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
        loss.backward()
        grads = [p.grad for p in net_lo.parameters() if p.grad is not None]
        assert len(grads) == len(list(net_lo.parameters()))
        assert all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


# -- docs/method.md §3: the shaped loss's minimiser is the eps-model of the shaped marginal ------------------

MU, SIG = 2.0, 0.3              # x_0 ~ 0.5 N(-2, 0.3^2) + 0.5 N(2, 0.3^2), one feature dimension
T_ = 1000
ABAR = torch.tensor(common.noise_schedule("polynomial_2", T_), dtype=torch.float32)
ABAR64 = ABAR.double()
KNOTS = torch.linspace(-6, 6, 49, dtype=torch.float64)


def _eps_star(x, t):
    """-sqrt(1 - abar_t) * score of x_t's marginal,
    the mixture N(+-sqrt(abar_t) MU, abar_t SIG^2 + 1 - abar_t)."""
    a = ABAR64[t]
    m, v = a.sqrt() * MU, a * SIG ** 2 + 1 - a
    score = -(x - m * torch.tanh(m * x / v)) / v
    return -(1 - a).sqrt() * score


def _c(t, s):
    return ((1 - ABAR64[t]) / (1 - ABAR64[t] / ABAR64[s])).sqrt()


def _hat(x):
    """Piecewise-linear (hat) basis on KNOTS: a generic flexible function class, nothing mixture-specific."""
    h = KNOTS[1] - KNOTS[0]
    return (1 - (x.clamp(KNOTS[0], KNOTS[-1])[..., None] - KNOTS).abs() / h).clamp(min=0)


class _FnNet(nn.Module):
    """A 'network' whose feature output is f(x_t, t) for one atom with one feature; positions are zero.
    With a single atom the zero-CoM projection zeroes the position noise, so the problem is exactly 1-D."""
    h_nf = 1

    def __init__(self, f, record=None):
        super().__init__()
        self.f, self.record = f, record

    def forward(self, z, t, mask):                                          # z (B, 1, 4)
        tt = torch.round(t * T_).long()[:, None]                            # (B, 1) integer steps
        if self.record is not None:
            self.record.update(x=z[..., 3].detach().clone(), t=tt)
        out = torch.zeros_like(z)
        out[..., 3] = self.f(z[..., 3], tt)
        return out


def _x_s(B, s, gen):
    """x_s from the forward marginal at s of the mixture, as (B, 1, 4) states (positions 0, feature x_s)."""
    comp = torch.where(torch.rand(B, generator=gen) < 0.5, -MU, MU).double()
    x0 = comp + SIG * torch.randn(B, generator=gen, dtype=torch.float64)
    xs = ABAR64[s].sqrt() * x0 + (1 - ABAR64[s]).sqrt() * torch.randn(B, generator=gen, dtype=torch.float64)
    z = torch.zeros(B, 1, 4, dtype=torch.float64)
    z[:, 0, 3] = xs
    return z, torch.ones(B, 1, dtype=torch.bool)


def _x_t(B, t, gen):
    comp = torch.where(torch.rand(B, generator=gen) < 0.5, -MU, MU).double()
    x0 = comp + SIG * torch.randn(B, generator=gen, dtype=torch.float64)
    return ABAR64[t].sqrt() * x0 + (1 - ABAR64[t]).sqrt() * torch.randn(B, generator=gen, dtype=torch.float64)


def _fit(z, mask, s, t, scale=None):
    """argmin_w of shaped_loss for the net f(x) = hat(x) @ w at the fixed step t (with a tiny
    second-difference penalty so knots with almost no data stay smooth). The loss is quadratic in w: one
    Newton step from 0. `scale(t)` multiplies the network's output: with scale = c_t,
    shaped_loss(c_t f) = E|f - eps'|^2 is GRAFT's unshifted loss on the x_s data."""
    mult = (lambda tt: scale(tt)) if scale is not None else (lambda tt: 1.0)

    def loss(w):
        net = _FnNet(lambda x, tt: mult(tt) * (_hat(x) @ w))
        return gm.shaped_loss(net, z, mask, ABAR, t, t, abar_s=ABAR[s], gen=torch.Generator().manual_seed(7))

    w0 = torch.zeros(len(KNOTS), dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(loss, w0)
    hess = torch.autograd.functional.hessian(loss, w0, vectorize=True)
    D2 = torch.diff(torch.eye(len(KNOTS), dtype=torch.float64), n=2, dim=0)
    return -torch.linalg.solve(hess + 1e-4 * D2.T @ D2, grad)


def test_shaped_loss_minimiser_is_analytic_eps():
    s = 500                                                                 # abar_s = 0.56
    gen = torch.Generator().manual_seed(0)
    z, mask = _x_s(50_000, s, gen)

    # (a) over t in (s, T]: the analytic eps has the lowest loss; the excess of a perturbation f* + d is
    # E[(d / c_t)^2] / D (D = 4 dims per atom), i.e. the cross term vanishes: f* is a stationary point
    rec = {}

    def L(f, seed=3):
        return gm.shaped_loss(_FnNet(f, rec), z, mask, ABAR, s + 1, T_, abar_s=ABAR[s],
                              gen=torch.Generator().manual_seed(seed)).item()

    base = L(_eps_star)
    x_t, t = rec["x"], rec["t"]
    c = _c(t, s)
    perturbations = {"const": lambda x, tt: 0.1 + 0 * x, "linear": lambda x, tt: 0.1 * x,
                     "scaled": lambda x, tt: 0.2 * _eps_star(x, tt),
                     "unshifted minimiser": lambda x, tt: _eps_star(x, tt) * (1 / _c(tt, s) - 1)}
    for name, d in perturbations.items():
        gap = L(lambda x, tt: _eps_star(x, tt) + d(x, tt)) - base
        predicted = ((d(x_t, t) / c) ** 2).mean().item() / 4
        assert gap > 0, name
        assert gap == pytest.approx(predicted, rel=0.25), (name, gap, predicted)

    # (b) fitting a flexible function to the shaped loss recovers the analytic eps at fixed t;
    # (c) GRAFT's unshifted loss (c_t -> 1) on the same x_s data recovers eps*/c_t instead, far from eps*
    for t in (550, 650, 800):
        xt = _x_t(50_000, t, gen)
        f_star = _eps_star(xt, t)
        rms = f_star.pow(2).mean().sqrt()
        err = lambda f: ((f - f_star).pow(2).mean().sqrt() / rms).item()
        w = _fit(z, mask, s, t)
        assert err(_hat(xt) @ w) < 0.12, (t, err(_hat(xt) @ w))
        c_t = _c(t, s).item()
        if c_t > 1.2:                                                       # t close to s: c_t far from 1
            w_u = _fit(z, mask, s, t, scale=lambda tt: _c(tt, s))
            f_u = _hat(xt) @ w_u
            assert err(f_u) > 0.6 * (1 - 1 / c_t), (t, c_t, err(f_u))      # ~ (1 - 1/c_t): 0.49, 0.22
            assert ((f_u - f_star / c_t).pow(2).mean().sqrt() / rms).item() < 0.12


# -- checkpoints and CLI errors ------------------------------------------------------------------------------

def _bad_refs(tmp_path):
    missing = str(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    torch.manual_seed(0)
    small = gm.build_model(CFG_TINY)
    wrong = str(tmp_path / "wrong_arch.pt")
    common.save_checkpoint(wrong, {"model": small.state_dict(), "ema": small.state_dict()},
                           {"model": dict(CFG_TINY, nf=64)})
    return {"missing": (missing, "does not exist"), "corrupt": (str(corrupt), "not a readable"),
            "wrong_arch": (wrong, "does not fit")}


def test_load_reference_bad_ref_exits_with_one_line(tmp_path):
    for name, (ref, what) in _bad_refs(tmp_path).items():
        with pytest.raises(SystemExit) as e:
            gm.load_reference(ref, torch.device("cpu"), CFG_TINY)
        msg = str(e.value.code)
        assert msg.startswith("graft_molecule: ") and "\n" not in msg, (name, msg)
        assert what in msg and os.path.basename(ref) in msg, (name, msg)


def test_load_reference_prefers_ema_and_loads_edm_state_dicts(tmp_path):
    torch.manual_seed(0)
    model, ema = gm.build_model(CFG_TINY), gm.build_model(CFG_TINY)
    path = str(tmp_path / "ref.pt")
    common.save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict()}, {"model": CFG_TINY})
    net, cfg = gm.load_reference(path, torch.device("cpu"), {"nf": 999})
    assert cfg == CFG_TINY and not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k])
    # EDM's released file: a bare EnVariationalDiffusion state_dict, built from the size flags
    edm = {f"dynamics.{k}": v for k, v in model.state_dict().items()}
    edm.update({"gamma.gamma": torch.zeros(1001), "buffer": torch.zeros(1)})
    torch.save(edm, tmp_path / "generative_model_ema.npy")
    net, cfg = gm.load_reference(str(tmp_path / "generative_model_ema.npy"), torch.device("cpu"), CFG_TINY)
    assert cfg == CFG_TINY
    for k, v in net.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_arch"])
def test_bad_ref_gives_one_line_error(tmp_path, case):
    ref, what = _bad_refs(tmp_path)[case]
    p = subprocess.run([sys.executable, "graft_molecule.py", "--eval_only", "--ref", ref, "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, f"--eval_only with a {case} reference must fail (stdout: {p.stdout[-300:]!r})"
    err = p.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert what in err and os.path.basename(ref) in err, err


@pytest.mark.parametrize("argv", [["--n_i", "1.0"], ["--n_i", "-0.1"], ["--K", "0"],
                                  ["--M", "10", "--K", "11"], ["--reward", "nosuch"], ["--N", "0"],
                                  ["--N", "2000"], ["--stratify", "--accept", "threshold", "--tau", "1"]])
def test_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gm.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_good_flags_parse_with_derived_quantities():
    args = gm.parse_args(["--n_i", "0.25", "--N", "8", "--M", "10", "--K", "10"])
    assert args.N_I == 2 and args.K == 10 and args.dedup and args.reward == "stable"
    args = gm.parse_args([])
    assert args.n_i == 0 and args.N_I == 0 and args.K <= args.M
