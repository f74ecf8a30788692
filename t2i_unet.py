"""t2i_unet.py — the networks of graft_t2i.py: a small transformer text encoder over t2i_world.tokenize ids
and a text-conditional DDPM UNet (ResBlocks + GroupNorm + time embedding, cross-attention to the text tokens
at the 16x16 and 8x8 levels), trained jointly as one eps-predictor eps_theta(x_t, t, tokens).

Sized for CPU sampling: an optional space-to-depth stem (`patch` 2: 32x32x3 -> 16x16x12, pixel_shuffle back at
the end) puts the convolutions on 16x16 and coarser, where most of the cost is. The text encoder prepends a
learned BOS token that is never masked, so the all-padding "empty prompt" of classifier-free guidance has a
well-defined encoding (attention over padding alone would be a softmax over nothing).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from t2i_world import tokenize


def norm(c):
    return nn.GroupNorm(max(1, min(math.gcd(32, c), c // 4)), c)


class TextEncoder(nn.Module):
    """ids (B, L) long, 0 padding -> (tokens (B, L+1, d), key mask (B, L+1) bool, True = real): word +
    position embeddings, a BOS token in front, n_layers pre-norm transformer layers with padding masked."""

    def __init__(self, vocab_size, d, n_layers, heads, length):
        super().__init__()
        self.word = nn.Embedding(vocab_size + 1, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(length + 1, d) * 0.02)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, ids):
        B, L = ids.shape
        h = torch.cat([self.bos.expand(B, 1, -1), self.word(ids)], 1) + self.pos[:L + 1]   # (B, L+1, d)
        real = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ids.device), ids > 0], 1)  # (B, L+1)
        return self.out_norm(self.layers(h, src_key_padding_mask=~real)), real


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.n1, self.c1, self.t = norm(cin), nn.Conv2d(cin, cout, 3, padding=1), nn.Linear(temb, cout)
        self.n2, self.c2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, ctx=None):
        h = self.c1(F.silu(self.n1(x))) + self.t(emb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class CrossAttention(nn.Module):
    """Image positions attend to the text tokens (padding masked), residual."""

    def __init__(self, c, d_text, heads):
        super().__init__()
        self.heads, self.n = heads, norm(c)
        self.q, self.kv, self.proj = nn.Conv2d(c, c, 1), nn.Linear(d_text, 2 * c), nn.Conv2d(c, c, 1)

    def forward(self, x, emb, ctx):
        tokens, real = ctx                                                         # (B, L, d), (B, L)
        B, C, H, W = x.shape
        h, c = self.heads, C // self.heads
        q = self.q(self.n(x)).reshape(B, h, c, H * W)                              # (B, h, c, HW)
        k, v = self.kv(tokens).reshape(B, -1, 2, h, c).permute(2, 0, 3, 1, 4)     # (B, h, L, c) each
        s = k @ q / math.sqrt(c) - 1e4 * (~real)[:, None, :, None]                # (B, h, L, HW)
        # the softmax over the L tokens, written out along dim 2: the innermost dim stays the long HW one
        # (torch.softmax over a last dim of 11 was 40% of the forward on a CPU)
        e = (s - s.amax(2, keepdim=True)).exp()
        a = v.transpose(2, 3) @ (e / e.sum(2, keepdim=True))                      # (B, h, c, HW)
        return x + self.proj(a.reshape(B, C, H, W))


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class T2IUNet(nn.Module):
    """eps_theta(x_t (B, 3, S, S), t (B,) integer steps 0..T as float, ids (B, L) long) -> (B, 3, S, S).
    Each level: n_res ResBlocks (+ cross-attention where the feature map is in attn_res), one skip per level;
    the pooled BOS token joins the time embedding (Imagen-style). The network's own output G is
    v-parameterised: eps = sqrt(abar_t) G + sqrt(1 - abar_t) x_t (v-prediction's identity), so the
    near-identity eps ~ x_t of high noise needs no learning (x0_hat ~ -G there); the interface, the DDPM eps
    loss and the sampler stay eps-prediction's."""

    def __init__(self, image_size=32, ch=32, ch_mult=(1, 2, 2), n_res=1, attn_res=(16, 8), patch=2,
                 vocab_size=40, d_text=64, text_layers=2, heads=4, length=10, T=1000, schedule="cosine"):
        super().__init__()
        abar = torch.tensor(common.noise_schedule(schedule, T), dtype=torch.float32)
        self.register_buffer("abar", abar, persistent=False)                         # (T+1,)
        self.patch, self.ch, temb, c_in = patch, ch, 4 * ch, 3 * patch * patch
        self.image_size, self.length = image_size, length
        self.text = TextEncoder(vocab_size, d_text, text_layers, heads, length)
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.pool = nn.Linear(d_text, temb)
        self.conv_in = nn.Conv2d(c_in, ch, 3, padding=1)

        def level(cin, cout, res, n):
            blocks, c = [], cin
            for _ in range(n):
                blocks.append(ResBlock(c, cout, temb))
                c = cout
                if res in attn_res:
                    blocks.append(CrossAttention(c, d_text, heads))
            return nn.ModuleList(blocks)

        res, c, skips = image_size // patch, ch, []
        self.down = nn.ModuleList()
        for i, m in enumerate(ch_mult):
            self.down.append(level(c, ch * m, res, n_res))
            c = ch * m
            skips.append(c)
            if i < len(ch_mult) - 1:
                self.down[-1].append(Down(c))
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, temb), CrossAttention(c, d_text, heads),
                                  ResBlock(c, c, temb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            self.up.append(level(c + skips.pop(), ch * m, res, n_res))
            c = ch * m
            if i > 0:
                self.up[-1].append(Up(c))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, c_in, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)

    def embed_time(self, t):
        half, w = self.ch // 2, self.conv_in.weight
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=w.device, dtype=w.dtype) / half)
        a = t.to(w.dtype)[:, None] * freqs[None]                                  # (B, ch/2), t in steps
        return self.temb(torch.cat([a.sin(), a.cos()], 1))                        # (B, 4 ch)

    # graft_t2i.py's model interface, which sd2.SD2 also has: pixels are the "latents", decoding is identity
    clip_x0 = True                                             # DDIM's x0_hat is clamped to the image range

    @property
    def latent_shape(self):
        return (3, self.image_size, self.image_size)

    def tokenize(self, prompts):
        return tokenize(prompts, self.length)                  # (B, length); the empty prompt is all padding

    def decode(self, x):
        return x

    def encode(self, ids):
        """The text context (tokens, mask) and its pooled BOS vector; computed once per sampler run."""
        return self.text(ids)

    def forward(self, x, t, ids=None, ctx=None):
        ctx = ctx if ctx is not None else self.encode(ids)
        emb = self.embed_time(t) + self.pool(ctx[0][:, 0])                        # (B, 4 ch)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)   # (B, ch, S/p, S/p)
        skips = []
        for blocks in self.down:
            for b in blocks:
                if isinstance(b, Down):
                    skips.append(h)
                h = b(h, emb, ctx)
            if not isinstance(blocks[-1], Down):
                skips.append(h)
        for b in self.mid:
            h = b(h, emb, ctx)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], 1)
            for b in blocks:
                h = b(h, emb, ctx)
        h = self.out(h)                                                           # (B, 3 p^2, S/p, S/p)
        v = F.pixel_shuffle(h, self.patch) if self.patch > 1 else h              # (B, 3, S, S)
        a = self.abar[t.round().long()].to(x.dtype).view(-1, 1, 1, 1)            # abar_t (B, 1, 1, 1)
        return a.sqrt() * v + (1 - a).sqrt() * x
