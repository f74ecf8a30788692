"""egnn.py — the E(n)-equivariant network of EDM (Hoogeboom et al. 2022, egnn/egnn_new.py + egnn/models.py),
rewritten densely over padded atoms. Module and parameter names follow EDM's, so its released QM9 checkpoint
(outputs/edm_qm9/generative_model_ema.npy) loads with strict=True after edm_state_dict().
"""
import torch
import torch.nn as nn


def pair_linear(lin, h, e):
    """lin(cat[h_i, h_j, e_ij]) for all pairs without building the (B, n, n, 2nf+d) concatenation:
    split the weight into its h_i, h_j and e parts (same parameters as EDM's nn.Linear, far fewer FLOPs)."""
    nf = h.shape[-1]
    w = lin.weight
    hi = h @ w[:, :nf].T                                                         # (B, n, out)
    hj = h @ w[:, nf:2 * nf].T                                                   # (B, n, out)
    return hi[:, :, None] + hj[:, None, :] + e @ w[:, 2 * nf:].T + lin.bias      # (B, n, n, out)


class GCL(nn.Module):
    """Invariant message passing: m_ij = phi_e(h_i, h_j, d_ij), attention-weighted, summed over j."""

    def __init__(self, nf, edge_nf, attention, act):
        super().__init__()
        self.edge_mlp = nn.Sequential(nn.Linear(2 * nf + edge_nf, nf), act, nn.Linear(nf, nf), act)
        self.node_mlp = nn.Sequential(nn.Linear(2 * nf, nf), act, nn.Linear(nf, nf))
        self.attention = attention
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(nf, 1), nn.Sigmoid())

    def forward(self, h, e, node_mask, edge_mask):
        m = self.edge_mlp[1:](pair_linear(self.edge_mlp[0], h, e))               # (B, n, n, nf)
        if self.attention:
            m = m * self.att_mlp(m)
        agg = (m * edge_mask).sum(2)                                             # (B, n, nf), normalization_factor 1
        return (h + self.node_mlp(torch.cat([h, agg], -1))) * node_mask


class EquivariantUpdate(nn.Module):
    """x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * tanh(phi_x(h_i, h_j, d_ij)) * coords_range."""

    def __init__(self, nf, edge_nf, tanh, coords_range, act):
        super().__init__()
        last = nn.Linear(nf, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(2 * nf + edge_nf, nf), act, nn.Linear(nf, nf), act, last)
        self.tanh, self.coords_range = tanh, coords_range

    def forward(self, h, x, coord_diff, e, node_mask, edge_mask):
        w = self.coord_mlp[1:](pair_linear(self.coord_mlp[0], h, e))             # (B, n, n, 1)
        if self.tanh:
            w = torch.tanh(w) * self.coords_range
        return (x + (coord_diff * w * edge_mask).sum(2)) * node_mask


def coord2diff(x, norm_constant=1.0):
    diff = x[:, :, None] - x[:, None, :]                                         # (B, n, n, 3)
    radial = (diff ** 2).sum(-1, keepdim=True)                                   # (B, n, n, 1)
    return radial, diff / (torch.sqrt(radial + 1e-8) + norm_constant)


class EquivariantBlock(nn.Module):
    def __init__(self, nf, attention, tanh, act, coords_range=15.0):
        super().__init__()
        self.gcl_0 = GCL(nf, 2, attention, act)   # EDM's QM9 model has inv_sublayers = 1
        self.gcl_equiv = EquivariantUpdate(nf, 2, tanh, coords_range, act)

    def forward(self, h, x, d0, node_mask, edge_mask):
        radial, coord_diff = coord2diff(x)
        e = torch.cat([radial, d0], -1)                                          # (B, n, n, 2)
        h = self.gcl_0(h, e, node_mask, edge_mask)
        x = self.gcl_equiv(h, x, coord_diff, e, node_mask, edge_mask)
        return h * node_mask, x


class EGNN(nn.Module):
    def __init__(self, in_nf, nf, n_layers, attention, tanh):
        super().__init__()
        act = nn.SiLU()
        self.embedding = nn.Linear(in_nf, nf)
        self.embedding_out = nn.Linear(nf, in_nf)
        for i in range(n_layers):
            self.add_module(f"e_block_{i}", EquivariantBlock(nf, attention, tanh, act))
        self.n_layers = n_layers

    def forward(self, h, x, node_mask, edge_mask):
        d0, _ = coord2diff(x)
        h = self.embedding(h)
        for i in range(self.n_layers):
            h, x = getattr(self, f"e_block_{i}")(h, x, d0, node_mask, edge_mask)
        return self.embedding_out(h) * node_mask, x


def remove_mean(x, mask):
    """Project positions to zero centre of mass over the real atoms. x (B, n, 3), mask (B, n)."""
    m = mask[..., None].float()
    return (x - (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)) * m


class EGNNDynamics(nn.Module):
    """eps_theta(z_t, t): z = [x (3), h (F)] per atom -> predicted noise of the same shape (EDM's
    EGNN_dynamics_QM9). The position part is the EGNN's displacement, projected to zero CoM."""

    def __init__(self, nf, n_layers, attention=True, tanh=True, include_charges=True, **_):
        super().__init__()
        self.h_nf = 5 + int(include_charges)
        self.egnn = EGNN(self.h_nf + 1, nf, n_layers, attention, tanh)   # +1: time is a node feature

    def forward(self, z, t, mask):
        """z (B, n, 3+F), t (B,) in [0, 1], mask (B, n) bool -> eps (B, n, 3+F)."""
        B, n, _ = z.shape
        node_mask = mask[..., None].to(z.dtype)                                 # (B, n, 1)
        edge_mask = (node_mask[:, :, None] * node_mask[:, None, :]) \
            * (1 - torch.eye(n, device=z.device, dtype=z.dtype))[None, :, :, None]  # (B, n, n, 1), no self-edges
        x, h = z[..., :3] * node_mask, z[..., 3:] * node_mask
        h = torch.cat([h, t.view(B, 1, 1).expand(B, n, 1).to(z.dtype)], -1)        # (B, n, F+1)
        h_out, x_out = self.egnn(h, x, node_mask, edge_mask)
        vel = remove_mean(x_out - x, mask)
        return torch.cat([vel, h_out[..., :-1]], -1) * node_mask


def edm_state_dict(sd):
    """EDM's released EnVariationalDiffusion state_dict -> ours: strip 'dynamics.', drop the schedule table
    ('gamma.gamma', recomputed by common.noise_schedule) and the 'buffer' placeholder."""
    if not any(k.startswith("dynamics.") for k in sd):
        return sd
    return {k[len("dynamics."):]: v for k, v in sd.items() if k.startswith("dynamics.")}
