"""sd2.py — Stable Diffusion 2 from scratch for graft_t2i.py --preset sd2: the UNet, the VAE, LoRA, and loading
all of it (with sd2_clip.py's text encoder and tokenizer) from the Hugging Face Hub's diffusers layout.

Module attribute names equal the keys of the Hub's `unet/` and `vae/` safetensors, so the weights load with
`load_state_dict(strict=True)` and no renaming table (tests/test_sd2.py checks this against diffusers at SD2's
full configuration and checks outputs on small random ones). The wrapper `SD2` gives graft_t2i.py the
interface of its own world model: `tokenize`, `encode` (text), `forward(x_t, t, ids | ctx) -> eps` on the
script's time index t = 1..T (the Hub's timestep t - 1; v-prediction is turned into eps), and `decode`.

    stabilityai/stable-diffusion-2-1-base   512 px, latents 4x64x64, eps-prediction
    stabilityai/stable-diffusion-2-1        768 px, latents 4x96x96, v-prediction (attention upcast to fp32)
"""
import functools
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sd2_clip import CLIPTextEncoder, CLIPTokenizer

# the Hub's unet/config.json and vae/config.json of stabilityai/stable-diffusion-2-1-base (the keys we read)
SD2_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                       layers_per_block=2, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                       use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
                       freq_shift=0, upcast_attention=False,
                       down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD2_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                      layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215, sample_size=512)
SD2_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", prediction_type="epsilon")


# -- building blocks shared by the UNet and the VAE ----------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between (UNet only), a 1x1 shortcut if the width
    changes."""

    def __init__(self, c_in, c_out, temb=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out) if temb else None
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))                                        # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention with the Hub's projection names; context None is self-attention. upcast: q k^T and
    the softmax in fp32 (SD2-768's setting, against fp16 overflow)."""

    def __init__(self, dim, ctx_dim=None, heads=8, head_dim=64, bias=False, upcast=False):
        super().__init__()
        inner, ctx_dim = heads * head_dim, ctx_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q, self.to_k = nn.Linear(dim, inner, bias=bias), nn.Linear(ctx_dim, inner, bias=bias)
        self.to_v = nn.Linear(ctx_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, ctx=None):
        B, L, _ = x.shape
        ctx = x if ctx is None else ctx
        q, k, v = (f(a).view(B, a.shape[1], self.heads, -1).transpose(1, 2)               # (B, heads, L, d)
                   for f, a in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        h = F.scaled_dot_product_attention(q, k, v).to(dtype)                        # (B, heads, L, d)
        return self.to_out[0](h.transpose(1, 2).reshape(B, L, -1))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; residual each."""

    def __init__(self, dim, heads, head_dim, ctx_dim, upcast):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads, head_dim, upcast=upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, ctx_dim, heads, head_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, h, ctx):
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), ctx)
        return h + self.ff.net[2](self.ff.net[0](self.norm3(h)))


class Transformer2DModel(nn.Module):
    """A feature map (B, C, H, W) as H*W tokens through one transformer block, linear projections in and out
    (SD2's `use_linear_projection`), residual."""

    def __init__(self, dim, heads, ctx_dim, groups, upcast):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in, self.proj_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, dim // heads, ctx_dim,
                                                                       upcast)])

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))       # (B, HW, C)
        h = self.proj_out(self.transformer_blocks[0](h, ctx))
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class Conv(nn.Module):
    """The Hub's `downsamplers.0` / `upsamplers.0`: a module holding one 3x3 `conv`. down: stride 2 (VAE: no
    padding, the input padded by one pixel right and bottom); up: nearest x2, then the conv."""

    def __init__(self, c, mode, pad=1):
        super().__init__()
        self.mode, self.pad = mode, pad
        self.conv = nn.Conv2d(c, c, 3, stride=2 if mode == "down" else 1, padding=pad)

    def forward(self, x):
        if self.mode == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.pad == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def block(resnets, attentions=None, sampler=None):
    """A down, up or mid block: the Hub's `resnets`, `attentions`, `downsamplers` / `upsamplers` lists."""
    b = nn.Module()
    b.resnets = nn.ModuleList(resnets)
    if attentions:
        b.attentions = nn.ModuleList(attentions)
    if sampler is not None:
        setattr(b, "downsamplers" if sampler.mode == "down" else "upsamplers", nn.ModuleList([sampler]))
    return b


# -- the UNet (diffusers' UNet2DConditionModel with SD2's blocks) --------------------------------------------

def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0.0):
    """Sinusoids exp(-log(10^4) i / (dim/2 - shift)) t, as (cos, sin) with flip_sin_to_cos: (B, dim)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * i / (half - shift))
    emb = t.float()[:, None] * freqs[None]                                           # (B, half)
    emb = torch.cat([emb.sin(), emb.cos()], -1)
    return torch.cat([emb[:, half:], emb[:, :half]], -1) if flip_sin_to_cos else emb


class UNet(nn.Module):
    """eps (or v) = UNet(latents (B, 4, h, w), timestep (B,) in 0..999, text (B, 77, 1024)). Down blocks of
    `layers_per_block` resnets (+ a transformer each where cross-attention), a downsampler on all but the last;
    a mid block resnet-transformer-resnet; up blocks of one more resnet each, fed the skip features in reverse.
    `attention_head_dim` in the Hub's config is the number of heads per block (a naming slip diffusers keeps),
    so SD2's head width is 64 everywhere."""

    def __init__(self, cfg):
        super().__init__()
        ch, L = cfg["block_out_channels"], cfg["layers_per_block"]
        g, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        heads = cfg["attention_head_dim"]
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(ch)
        unknown = set(cfg["down_block_types"] + cfg["up_block_types"]) - {
            "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        if unknown or not cfg.get("use_linear_projection", True):
            raise ValueError(f"not an SD2 UNet config (blocks {sorted(unknown)}, linear projection "
                             f"{cfg.get('use_linear_projection')})")
        self.cfg, self.gradient_checkpointing, temb = cfg, False, 4 * ch[0]
        ctx, up = cfg["cross_attention_dim"], cfg.get("upcast_attention", False)

        def res(a, b):
            return ResnetBlock2D(a, b, temb, g, eps)

        def attn(c, h):
            return Transformer2DModel(c, h, ctx, g, up)

        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)
        self.down_blocks, c_prev = nn.ModuleList(), ch[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            cross, last = kind.startswith("CrossAttn"), i == len(ch) - 1
            self.down_blocks.append(block([res(c_prev if j == 0 else ch[i], ch[i]) for j in range(L)],
                                          [attn(ch[i], heads[i]) for _ in range(L)] if cross else None,
                                          None if last else Conv(ch[i], "down")))
            c_prev = ch[i]
        self.mid_block = block([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])], [attn(ch[-1], heads[-1])])
        self.up_blocks, rch, rheads = nn.ModuleList(), ch[::-1], heads[::-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            cross, last, c_out = kind.startswith("CrossAttn"), i == len(ch) - 1, rch[i]
            c_skip_in = rch[min(i + 1, len(ch) - 1)]                  # the width of this level's first skip
            c_prev = rch[max(i - 1, 0)]
            self.up_blocks.append(block(
                [res((c_prev if j == 0 else c_out) + (c_skip_in if j == L else c_out), c_out)
                 for j in range(L + 1)],
                [attn(c_out, rheads[i]) for _ in range(L + 1)] if cross else None,
                None if last else Conv(c_out, "up")))
        self.conv_norm_out, self.conv_out = nn.GroupNorm(g, ch[0], eps), nn.Conv2d(ch[0], cfg["out_channels"], 3,
                                                                                   padding=1)

    def _run(self, f, *a):
        return checkpoint(f, *a, use_reentrant=False) if self.gradient_checkpointing and self.training else f(*a)

    def _layers(self, b, h, temb, ctx, skips=None):
        for j, r in enumerate(b.resnets):
            if skips is not None:
                h = torch.cat([h, skips.pop()], 1)                                    # (B, C + C_skip, h, w)
            h = self._run(r, h, temb)
            if hasattr(b, "attentions"):
                h = self._run(b.attentions[j], h, ctx)
            if skips is None:
                yield h
        if skips is not None:
            yield h

    def forward(self, x, timestep, ctx):
        t = timestep.expand(len(x)) if timestep.dim() == 0 else timestep
        e = timestep_embedding(t, self.cfg["block_out_channels"][0], self.cfg["flip_sin_to_cos"],
                               self.cfg["freq_shift"]).to(x.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(e)))  # (B, 4 C_0)
        h = self.conv_in(x)
        skips = [h]
        for b in self.down_blocks:
            for h in self._layers(b, h, temb, ctx):
                skips.append(h)
            if hasattr(b, "downsamplers"):
                h = b.downsamplers[0](h)
                skips.append(h)
        m = self.mid_block
        h = m.resnets[1](m.attentions[0](m.resnets[0](h, temb), ctx), temb)
        for b in self.up_blocks:
            h = list(self._layers(b, h, temb, ctx, skips))[-1]
            if hasattr(b, "upsamplers"):
                h = b.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))                          # (B, 4, h, w)


# -- the VAE (diffusers' AutoencoderKL) -----------------------------------------------------------------------

class VAEAttention(nn.Module):
    """The VAE's single-head spatial self-attention at the lowest resolution, GroupNorm in front, residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)                     # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        return x + self.to_out[0](h[:, 0]).transpose(1, 2).view(B, C, H, W)


class Coder(nn.Module):
    """The VAE's encoder (image -> 2 x latent channels: mean and log-variance) or decoder (latent -> image)."""

    def __init__(self, cfg, encoder):
        super().__init__()
        ch, L, g = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"]
        z = cfg["latent_channels"]

        def res(a, b):
            return ResnetBlock2D(a, b, None, g, 1e-6)

        chs = ch if encoder else ch[::-1]
        self.conv_in = nn.Conv2d(cfg["in_channels"] if encoder else z, chs[0], 3, padding=1)
        self.mid_block = block([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])], [VAEAttention(ch[-1], g)])
        blocks, c_prev = [], chs[0]
        for i, c in enumerate(chs):
            last = i == len(ch) - 1
            n = L if encoder else L + 1
            sampler = None if last else Conv(c, "down", pad=0) if encoder else Conv(c, "up")
            blocks.append(block([res(c_prev if j == 0 else c, c) for j in range(n)], None, sampler))
            c_prev = c
        setattr(self, "down_blocks" if encoder else "up_blocks", nn.ModuleList(blocks))
        self.encoder = encoder
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * z if encoder else cfg["out_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        m = self.mid_block
        if not self.encoder:
            h = m.resnets[1](m.attentions[0](m.resnets[0](h)))
        for b in (self.down_blocks if self.encoder else self.up_blocks):
            for r in b.resnets:
                h = r(h)
            for s in getattr(b, "downsamplers", []) or getattr(b, "upsamplers", []):
                h = s(h)
        if self.encoder:
            h = m.resnets[1](m.attentions[0](m.resnets[0](h)))
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's VAE: images (B, 3, 8h, 8w) in [-1, 1] <-> latents (B, 4, h, w); `scaling_factor` maps the
    encoder's mean to unit variance for the diffusion model."""

    def __init__(self, cfg):
        super().__init__()
        z = cfg["latent_channels"]
        self.cfg = cfg
        self.encoder, self.decoder = Coder(cfg, encoder=True), Coder(cfg, encoder=False)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def encode(self, x):
        """(mean, logvar) of the posterior, each (B, 4, h, w)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))                                  # (B, 3, 8h, 8w)


# -- LoRA on the UNet's attention projections -----------------------------------------------------------------

class LoRA(nn.Module):
    """Low-rank adapters W x + (alpha / r) B A dropout(x) on every attention projection (to_q, to_k, to_v,
    to_out.0) of a UNet, added by forward hooks, so the UNet's own state_dict (and the Hub's keys) stay as
    they are. B starts at zero: the adapted model starts equal to the base. `enabled` turns the adapter on
    and off in place: one UNet in memory is both the reference and the fine-tuned model (P-GRAFT's stitch).
    `merge()` folds B A into W for fast sampling; `unmerge()` takes it out again."""

    TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, unet, rank=4, alpha=4.0, dropout=0.0):
        super().__init__()
        self.rank, self.scale, self.enabled, self.merged = rank, alpha / rank, True, False
        self.drop, self.A, self.B, self.targets = nn.Dropout(dropout), nn.ParameterDict(), nn.ParameterDict(), {}
        for name, m in unet.named_modules():
            if isinstance(m, nn.Linear) and name.endswith(self.TARGETS) and ".attn" in name:
                key = name.replace(".", "_")
                self.A[key] = nn.Parameter(torch.empty(rank, m.in_features, device=m.weight.device))
                nn.init.kaiming_uniform_(self.A[key], a=math.sqrt(5))
                self.B[key] = nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device))
                self.targets[key] = m
                m.register_forward_hook(functools.partial(self._hook, key))
        if not self.targets:
            raise ValueError("LoRA found no attention projections to adapt")

    def _hook(self, key, module, inputs, out):
        if not self.enabled or self.merged:
            return out
        return out + self.scale * F.linear(F.linear(self.drop(inputs[0]), self.A[key].to(out.dtype)),
                                           self.B[key].to(out.dtype))

    @torch.no_grad()
    def merge(self, sign=1.0):
        if self.merged == (sign > 0):
            return
        for key, m in self.targets.items():
            m.weight += sign * self.scale * (self.B[key] @ self.A[key]).to(m.weight.dtype)
        self.merged = sign > 0

    def unmerge(self):
        self.merge(-1.0)


# -- the pipeline graft_t2i.py samples and fine-tunes ---------------------------------------------------------

def sd2_abar(sched):
    """abar (T+1,) on graft's time index: abar[0] = 1 (data), abar[t] = the Hub scheduler's alphas_cumprod[t - 1]
    (betas linear in sqrt(beta), 'scaled_linear')."""
    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"beta_schedule {sched['beta_schedule']!r} (SD2 uses scaled_linear)")
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).float()


class SD2(nn.Module):
    """UNet + VAE + text encoder + tokenizer with graft_t2i.py's model interface. `forward` returns eps on
    the script's time index t (1..T), converting v-prediction with eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
    `lora`, if attached, is applied or not by `adapter(on)`, a view sharing every weight."""

    clip_x0 = False                                  # latents are not images: DDIM's x0_hat is not clamped

    def __init__(self, unet, vae, text_encoder, tokenizer, sched):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.v_prediction = sched.get("prediction_type", "epsilon") == "v_prediction"
        self.register_buffer("abar", sd2_abar(sched), persistent=False)
        self.lora = None
        size = unet.cfg["sample_size"]
        self.latent_shape = (unet.cfg["in_channels"], size, size)

    def tokenize(self, prompts):
        return self.tokenizer(list(prompts))                                          # (B, 77)

    def encode(self, ids):
        return self.text_encoder(ids.to(self.abar.device))                           # (B, 77, D)

    def forward(self, x, t, ids=None, ctx=None):
        ctx = self.encode(ids) if ctx is None else ctx
        out = self.unet(x, (t - 1).to(x.dtype), ctx.to(x.dtype))                     # (B, 4, h, w)
        if not self.v_prediction:
            return out
        a = self.abar[t.long()].view(-1, 1, 1, 1).to(out.dtype)
        return a.sqrt() * out + (1 - a).sqrt() * x

    def decode(self, z):
        """Latents -> images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(z.to(self.abar.device) / self.vae.cfg["scaling_factor"]).clamp(-1, 1)

    def add_lora(self, rank=4, alpha=4.0, dropout=0.0):
        self.requires_grad_(False)
        self.lora = LoRA(self.unet, rank, alpha, dropout)
        return self.lora

    def adapter(self, on):
        return Adapted(self, on)


class Adapted(nn.Module):
    """SD2 with its LoRA switched on or off for every call: P-GRAFT's net_hi (on, t > s) and net_lo (off)."""

    def __init__(self, sd2, on):
        super().__init__()
        self.sd2, self.on = sd2, on
        self.clip_x0, self.latent_shape = sd2.clip_x0, sd2.latent_shape

    def _switch(self):
        self.sd2.lora.enabled = self.on

    def forward(self, *a, **k):
        self._switch()
        return self.sd2(*a, **k)

    def encode(self, ids):
        return self.sd2.encode(ids)

    def tokenize(self, prompts):
        return self.sd2.tokenize(prompts)

    def decode(self, z):
        return self.sd2.decode(z)


# -- the paper's reward: VQAScore through t2v-metrics --------------------------------------------------------

class VQAScore:
    """VQAScore (Lin et al. 2024): P('Yes' | image, 'Does this figure show "{prompt}"?') from CLIP-FlanT5, the
    paper's text-to-image reward, through the optional t2v-metrics package, with graft_t2i.py's reward
    interface (images (B, 3, H, W) in [-1, 1], prompts) -> (B,). Images go to it as PNG files, one call per
    distinct prompt (t2v-metrics scores every image against every text given)."""

    def __init__(self, model="clip-flant5-xl", device="cpu"):
        try:
            import t2v_metrics
        except ImportError:
            raise SystemExit("graft_t2i: --reward vqascore needs t2v-metrics: pip install t2v-metrics") from None
        self.scorer = t2v_metrics.VQAScore(model=model, device=str(device))

    def __call__(self, images, prompts):
        import tempfile
        from PIL import Image
        from t2i_world import to_uint8
        r = torch.empty(len(prompts))
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, f"{i}.png") for i in range(len(prompts))]
            for path, im in zip(paths, to_uint8(images)):                      # (H, W, 3) uint8 each
                Image.fromarray(im).save(path)
            for p in dict.fromkeys(prompts):
                idx = [i for i, q in enumerate(prompts) if q == p]
                r[idx] = self.scorer(images=[paths[i] for i in idx], texts=[p]).float().cpu()[:, 0]
        return r


# -- loading from the Hugging Face Hub (diffusers layout), one error line for what is missing ----------------

class SD2LoadError(Exception):
    pass


def hub_file(repo_id, filename, revision=None):
    """A file of a Hub model repo through huggingface_hub (its cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise SD2LoadError(f"could not get {filename} of {repo_id} from the Hugging Face Hub "
                           f"({type(e).__name__}: {msg[:160]})") from None


def hub_weights(repo_id, sub, stem, revision=None):
    """`{sub}/{stem}.fp16.safetensors` where the repo has it (half the download), else `{stem}.safetensors`."""
    from safetensors.torch import load_file
    try:
        path = hub_file(repo_id, f"{sub}/{stem}.fp16.safetensors", revision)
    except SD2LoadError:
        path = hub_file(repo_id, f"{sub}/{stem}.safetensors", revision)
    try:
        return load_file(path)
    except Exception as e:
        raise SD2LoadError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None


def vae_hub_state_dict(sd):
    """SD2's VAE files predate diffusers' renaming of the VAE's attention (query, key, value, proj_attn ->
    to_q, to_k, to_v, to_out.0); some copies still carry the old names, the only keys renamed anywhere here."""
    old = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    for k in [k for k in sd if ".attentions." in k]:
        for a, b in old.items():
            if a in k:
                sd[k.replace(a, b)] = sd.pop(k)
    return sd


def load_into(module, sd, what):
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = lines[1] if len(lines) > 1 else lines[0]
        raise SD2LoadError(f"{what} does not match its config ({first[:200]})") from None


def load_sd2(repo_id="stabilityai/stable-diffusion-2-1-base", revision=None, dtype=torch.float32, device="cpu"):
    """The four parts of an SD2 repo in the Hub's diffusers layout: `unet/`, `vae/`, `text_encoder/` (config.json
    + safetensors), `tokenizer/` (vocab.json, merges.txt) and `scheduler/scheduler_config.json`."""
    def config(sub, name="config.json"):
        with open(hub_file(repo_id, f"{sub}/{name}", revision)) as f:
            return json.load(f)

    unet_cfg, vae_cfg, text_cfg = config("unet"), config("vae"), config("text_encoder")
    sched = config("scheduler", "scheduler_config.json")
    try:
        unet, vae, text = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextEncoder.from_config(text_cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise SD2LoadError(f"{repo_id}: a config this module cannot build ({type(e).__name__}: {e})") from None
    load_into(unet, hub_weights(repo_id, "unet", "diffusion_pytorch_model", revision), f"{repo_id} unet")
    load_into(vae, vae_hub_state_dict(hub_weights(repo_id, "vae", "diffusion_pytorch_model", revision)),
              f"{repo_id} vae")
    load_into(text, text.hub_state_dict(hub_weights(repo_id, "text_encoder", "model", revision)),
              f"{repo_id} text_encoder")
    tok = [hub_file(repo_id, f"tokenizer/{n}", revision) for n in ("vocab.json", "merges.txt")]
    try:
        special = hub_file(repo_id, "tokenizer/special_tokens_map.json", revision)
        with open(special) as f:
            pad = json.load(f).get("pad_token", "!")
        pad = pad["content"] if isinstance(pad, dict) else pad
    except SD2LoadError:
        pad = "!"
    model = SD2(unet, vae, text, CLIPTokenizer(*tok, pad_token=pad), sched)
    return model.to(device=device, dtype=dtype).eval()
