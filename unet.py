"""unet.py — the UNet of noise_correction.py: DDPM's architecture (time embedding, residual blocks, GroupNorm, SiLU,
attention at low resolution), sized by the script's presets; the base flow and the corrector are both one.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(c):
    return nn.GroupNorm(max(1, min(math.gcd(32, c), c // 4)), c)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.n1, self.c1, self.t = norm(cin), nn.Conv2d(cin, cout, 3, padding=1), nn.Linear(temb, cout)
        self.n2, self.c2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x))) + self.t(emb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Resample(nn.Module):
    """Stride-2 convolution down, or nearest-neighbour upsampling and a convolution up."""

    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.n(x)).reshape(B, 3, C, H * W).unbind(1)                   # (B, C, HW) each
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), -1)                        # (B, HW, HW)
        return x + self.proj((v @ w.transpose(1, 2)).reshape(B, C, H, W))


class UNet(nn.Module):
    """v_theta(x, t): t in [0, 1] (0 noise, 1 data). gauss_skip (the corrector [ours]): the output is a residual on
    top of the closed-form velocity towards N(g_mu, diag g_var); see velocity and flow_sample."""

    def __init__(self, in_ch, image_size, ch, ch_mult, n_res, attn_res, gauss_skip=False):
        super().__init__()
        self.gauss_skip, self.ch = gauss_skip, ch
        if gauss_skip:  # the diagonal-Gaussian fit of the corrector's data, set before training (train_corrector)
            self.register_buffer("g_mu", torch.zeros(in_ch, image_size, image_size))
            self.register_buffer("g_var", torch.ones(in_ch, image_size, image_size))
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, image_size
        for i, m in enumerate(ch_mult):
            for _ in range(n_res):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, temb)] + [Attention(ch * m)] * (res in attn_res)))
                c = ch * m
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Resample(c, up=False)]))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, temb), Attention(c), ResBlock(c, c, temb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(n_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + chans.pop(), ch * m, temb)] + [Attention(ch * m)] * (res in attn_res)))
                c = ch * m
            if i > 0:
                self.up.append(nn.ModuleList([Resample(c, up=True)]))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)  # a fresh corrector samples its Gaussian fit

    def embed(self, t):
        half, w = self.ch // 2, self.conv_in.weight
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=w.device, dtype=w.dtype) / half)
        a = 1000 * t.to(w.dtype)[:, None] * freqs[None]                                    # (B, ch/2)
        e = torch.cat([a.sin(), a.cos()], 1)
        return self.temb(F.pad(e, (0, self.ch - e.shape[1])))                             # (B, 4 ch)

    def forward(self, x, t):
        emb, h = self.embed(t), self.conv_in(x)
        skips = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for block in self.up:
            h = torch.cat([h, skips.pop()], 1) if isinstance(block[0], ResBlock) else h     # skip connections
            for layer in block:
                h = layer(h, emb)
        return self.out(h)
