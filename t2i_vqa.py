"""t2i_vqa.py — the reward of graft_t2i.py and a second, independent judge: small image + question yes/no
networks trained offline on t2i_world's scenes. Not the paper's algorithm (GRAFT lives in graft_t2i.py):
the analogue of its text-to-image reward, VQAScore = P("yes" | image, "Does this figure show '{prompt}'?").

The question. VQAScore asks a fixed template, "Does this figure show '{prompt}'?". In a closed vocabulary
the template is the same words around every prompt, so it carries no information: the networks read the
prompt's words alone (t2i_world.tokenize ids) and answer with one logit, P(yes) = sigmoid(logit).

Two networks, two architectures, two seeds, each trained on its own draws:
    reward  YesNoNet             a CNN over RGB + coordinate channels whose every block is FiLM-modulated by a
                                 word transformer's prompt vector (early fusion), two soft look-ups of the
                                 prompt's objects among 4 x 4 cells
    judge   CrossAttentionJudge  a text-independent CNN to an 8 x 8 grid of patches, a bidirectional GRU over
                                 the words, patches attending to words and words to patches (late fusion)
The judge scores what GRAFT optimised against the reward, so that reward hacking shows as a gap between them.

Training data, drawn on the fly from the world's TRAINING prompts only (held-out compositions are where
generated images are scored): per example a category uniformly, a prompt of it uniformly, then 50% a scene
of it (sample_scene), 35% a hard negative (hard_negative, every kind) and 15% a scene of another training
prompt (half of them from the same category), except that the reward's relation_share (30%) of the
examples are instead position prompts with a scene of them or of their flipped relation, half and half
(without them both networks answered flipped relations at chance; the judge still does, see TRAINING).
Labels are the truth of the scene (t2i_world.satisfies on its objects), so a mismatch that happens to fit
('a circle' with a scene of 'a red circle') is a positive.
Images are augmented as a small diffusion model draws: Gaussian blur (sigma 0-1 px), brightness and colour
jitter, additive noise (std 0-25/255). Binary cross-entropy on the answer, Adam, cosine learning rate, plus
an auxiliary loss that only training sees: from the image features, which (shape, colour) has its centre in
which cell of a grid (occupancy). It is what makes a few thousand CPU steps enough: without it the reward's
held-out AUC on hard negatives was 0.86-0.88 after 3,000 steps (shapes, bindings and relations unlearnt).

load_scorer(which) is the interface: it loads checkpoints/t2i_vqa_{reward,judge}.pt (training and writing
it once when missing) and returns scorer(images (B, 3, H, W) in [-1, 1], prompts [B str]) -> P(yes) (B,).
Measured numbers (held-out ROC AUC per category and kind, agreement, speed) are in each checkpoint's extra.
"""
import math
import os
import platform
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import rankdata
from tqdm import tqdm

import common
import t2i_world as world

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = {"reward": os.path.join(HERE, "checkpoints", "t2i_vqa_reward.pt"),
               "judge": os.path.join(HERE, "checkpoints", "t2i_vqa_judge.pt")}
VOCAB = len(world.vocabulary()) + 1            # word ids 1..27, 0 padding
MIX = (0.50, 0.35, 0.15)                       # positives / hard negatives / mismatched prompts
SCORE_BATCH = 1024                             # images per forward pass in a scorer
KINDS = len(world.SHAPES) * len(world.COLOURS)  # (shape, colour) channels of the auxiliary occupancy maps
AUX_BIAS = -5.0                                # initial logit of an occupancy cell (almost all are empty)

# architecture and training defaults of the two networks (recorded in each checkpoint's config)
CONFIGS = {
    "reward": dict(arch="film_cnn", size=32, widths=[32, 64, 96, 72], strides=[2, 2, 1, 2], d_text=64,
                   text_layers=1, heads=4, d_head=64, d_find=32),
    "judge": dict(arch="xattn_cnn", size=32, widths=[32, 64, 64], strides=[2, 2, 1], d_text=64, heads=4,
                  fusion_layers=2),
}
# the reward's lr 1e-3 stayed at chance. relation_share 0 left both networks at chance on flipped relations
# (held-out AUC 0.51 / 0.46 after 3,000 steps); 0.3 and 5,000 steps took the reward to 1.00, the judge to
# 0.50 only (2026-12-03), so the shipped judge keeps its 3,000-step recipe and is blind to left / right.
TRAINING = {"reward": dict(steps=5000, seed=0, batch=128, lr=4e-4, aux_weight=0.1, relation_share=0.3),
            "judge": dict(steps=3000, seed=1, batch=128, lr=1e-3, aux_weight=0.1, relation_share=0.0)}


# -- shared pieces -----------------------------------------------------------------------------------------

def coord_channels(x):
    """(B, 2, H, W): the x and y coordinate of every pixel in [-1, 1] (position is part of a prompt)."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([xs, ys], 1)


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, d) over keys / values y (B, M, d); key_pad (B, M) bool marks
    the keys to ignore (padding words)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.q, self.kv, self.out = heads, nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, y, key_pad=None):
        B, N, d = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)                    # (B, h, N, d / h)
        k, v = self.kv(y).view(B, y.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, M, d / h)
        mask = None if key_pad is None else ~key_pad[:, None, None, :]               # (B, 1, 1, M)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                 # (B, h, N, d / h)
        return self.out(a.transpose(1, 2).reshape(B, N, d))                         # (B, N, d)


class Block(nn.Module):
    """A pre-norm transformer block: x attends to `context` (itself when None), then an MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.n1, self.n2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, context=None, key_pad=None):
        h = self.n1(x)
        x = x + self.attn(h, h if context is None else context, key_pad)           # (B, N, d)
        return x + self.mlp(self.n2(x))


def masked_mean(x, pad):
    """Mean over the unpadded positions: x (B, N, d), pad (B, N) bool -> (B, d)."""
    keep = (~pad).unsqueeze(-1).to(x.dtype)                                           # (B, N, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


# -- the reward: FiLM-CNN with two grounded look-ups -------------------------------------------------------

class WordTransformer(nn.Module):
    """Word ids (B, L) -> the prompt vector (B, d): embeddings + positions, `layers` self-attention blocks,
    and a linear read of the L word slots (padding zeroed). Read by slot, not averaged: 'a purple square
    and a yellow circle' and its colour swap are the same bag of words (a mean-pooled encoder left swapped
    colours and flipped relations at chance, AUC 0.48). The words are the prompt's alone: VQAScore's
    template "Does this figure show '...'?" adds the same words to every question, which tells a
    closed-vocabulary model nothing."""

    def __init__(self, d, layers, heads, length=world.MAX_WORDS):
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, d, padding_idx=0), nn.Parameter(torch.zeros(length, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.read = nn.LayerNorm(d), nn.Linear(length * d, d)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens):
        pad = tokens == 0                                                            # (B, L)
        x = self.embed(tokens) + self.pos[:tokens.shape[1]]                          # (B, L, d)
        for block in self.blocks:
            x = block(x, key_pad=pad)
        x = self.norm(x) * (~pad).unsqueeze(-1)                                      # (B, L, d)
        return self.read(x.flatten(1))                                               # (B, d)


class FiLMBlock(nn.Module):
    """conv k x k (stride s) -> GroupNorm -> FiLM by the prompt (x (1 + gamma) + beta) -> SiLU."""

    def __init__(self, cin, cout, stride, d_text, kernel=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 1)
        self.norm = nn.GroupNorm(8, cout)
        self.film = nn.Linear(d_text, 2 * cout)

    def forward(self, x, t):
        gamma, beta = self.film(t)[:, :, None, None].chunk(2, 1)                    # (B, cout, 1, 1) each
        return F.silu(self.norm(self.conv(x)) * (1 + gamma) + beta)                 # (B, cout, H / s, W / s)


class YesNoNet(nn.Module):
    """The reward: P(yes | image, prompt) = sigmoid(forward(images, tokens)). A CNN over the image and two
    coordinate channels, each block FiLM-modulated by the prompt vector of a word transformer (early
    fusion). The last feature map is pooled to 4 x 4 cells (so 48 / 64 px inputs work); the prompt vector
    asks two soft look-ups over the cells, one per object it names (what is there and where: relations and
    colour bindings); the flattened cells and the two findings go through a FiLM-modulated hidden layer to
    the logit. The look-ups are grounded in training (aux 'lookup': the cells of the named object)."""

    def __init__(self, widths, strides, d_text, text_layers, heads, d_head, d_find, **_):
        super().__init__()
        self.text = WordTransformer(d_text, text_layers, heads)
        cins, C = [5] + list(widths[:-1]), widths[-1]                                # RGB + 2 coordinates
        self.blocks = nn.ModuleList(FiLMBlock(ci, co, s, d_text, 4 if k == 0 else 3)   # a 4 x 4 stem
                                    for k, (ci, co, s) in enumerate(zip(cins, widths, strides)))
        self.queries, self.keys = nn.Linear(d_text, 2 * d_find), nn.Linear(C + 2, d_find)
        self.values = nn.Linear(C, d_find)
        self.proj, self.norm = nn.Linear(16 * C + 2 * (d_find + 2), d_head), nn.LayerNorm(d_head)
        self.head_film, self.out = nn.Linear(d_text, 2 * d_head), nn.Linear(d_head, 1)
        self.occupancy = nn.Conv2d(C, KINDS, 1)                      # training only: what is where (4 x 4)
        nn.init.constant_(self.occupancy.bias, AUX_BIAS)

    def find(self, cells, t):
        """The prompt's two objects looked up among the cells (B, C, 4, 4): the findings (B, 2 (d_find + 2)),
        each the attention-weighted value and coordinates of the cells, and the look-up logits (B, 2, 16)."""
        B, C = cells.shape[:2]
        xy = coord_channels(cells).flatten(2).transpose(1, 2)                       # (B, 16, 2)
        c = cells.flatten(2).transpose(1, 2)                                         # (B, 16, C)
        q = self.queries(t).view(B, 2, -1)                                           # (B, 2, d_find)
        k = self.keys(torch.cat([c, xy], 2))                                         # (B, 16, d_find)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])                      # (B, 2, 16)
        found = torch.softmax(logits, -1) @ torch.cat([self.values(c), xy], 2)       # (B, 2, d_find + 2)
        return found.flatten(1), logits

    def forward(self, images, tokens, with_aux=False):
        t = self.text(tokens)                                                        # (B, d_text)
        h = torch.cat([images, coord_channels(images)], 1)                           # (B, 5, H, W)
        for block in self.blocks:
            h = block(h, t)
        cells = F.adaptive_avg_pool2d(h, 4)                                          # (B, C, 4, 4)
        found, lookup = self.find(cells, t)
        h = self.norm(self.proj(torch.cat([cells.flatten(1), found], 1)))           # (B, d_head)
        gamma, beta = self.head_film(t).chunk(2, 1)                                  # (B, d_head) each
        logits = self.out(F.silu(h * (1 + gamma) + beta)).squeeze(1)                 # (B,)
        if not with_aux:
            return logits
        return logits, {"occupancy": self.occupancy(cells), "lookup": lookup}       # (B, K, 4, 4), (B, 2, 16)


# -- the judge: CNN patches + cross-attention --------------------------------------------------------------

class CrossAttentionJudge(nn.Module):
    """The judge: a text-independent CNN (4 x 4 stride-2 and 3 x 3 convs, GroupNorm(1), GELU) to an 8 x 8
    grid of patch vectors (at 32 px) plus an MLP embedding of each patch's coordinates; the words (the
    prompt alone, as the reward's) embedded and read by a bidirectional GRU; `fusion_layers` rounds of
    patches attending to words, then words attending to patches (late fusion; the reward fuses early); the
    logit from the mean of the words and of the patches. Any input size works (more patches)."""

    def __init__(self, widths, strides, d_text, heads, fusion_layers, **_):
        super().__init__()
        layers, cin = [], 3
        for cout, s in zip(widths, strides):                     # a stride-2 conv has a 4 x 4 kernel
            layers += [nn.Conv2d(cin, cout, 2 + s, s, 1), nn.GroupNorm(1, cout), nn.GELU()]
            cin = cout
        self.cnn = nn.Sequential(*layers, nn.Conv2d(cin, d_text, 1))
        self.where = nn.Sequential(nn.Linear(2, d_text), nn.GELU(), nn.Linear(d_text, d_text))
        self.embed = nn.Embedding(VOCAB, d_text, padding_idx=0)
        self.gru = nn.GRU(d_text, d_text // 2, batch_first=True, bidirectional=True)
        self.to_words = nn.ModuleList(Block(d_text, heads) for _ in range(fusion_layers))
        self.to_patches = nn.ModuleList(Block(d_text, heads) for _ in range(fusion_layers))
        self.norm = nn.LayerNorm(2 * d_text)
        self.head = nn.Sequential(nn.Linear(2 * d_text, d_text), nn.GELU(), nn.Linear(d_text, 1))
        self.occupancy = nn.Conv2d(d_text, KINDS, 1)                # training only: what is where (8 x 8)
        nn.init.constant_(self.occupancy.bias, AUX_BIAS)

    def forward(self, images, tokens, with_aux=False):
        f = self.cnn(images)                                                         # (B, d, h, w)
        where = self.where(coord_channels(f)[0].flatten(1).T)                        # (h w, d)
        patches = f.flatten(2).transpose(1, 2) + where                               # (B, h w, d)
        pad = tokens == 0                                                            # (B, L)
        words, _ = self.gru(self.embed(tokens))                                      # (B, L, d)
        for to_patches, to_words in zip(self.to_patches, self.to_words):
            patches = to_patches(patches, words, pad)                                # patches read the words
            words = to_words(words, patches)                                         # words read the patches
        pooled = torch.cat([masked_mean(words, pad), patches.mean(1)], 1)            # (B, 2 d)
        logits = self.head(self.norm(pooled)).squeeze(1)                             # (B,)
        return (logits, {"occupancy": self.occupancy(f)}) if with_aux else logits    # (B, KINDS, h, w)


ARCHITECTURES = {"film_cnn": YesNoNet, "xattn_cnn": CrossAttentionJudge}


def build(config):
    """The network of a config (CONFIGS' form); CheckpointError for an unknown or malformed one."""
    try:
        return ARCHITECTURES[config["arch"]](**config)
    except (KeyError, TypeError, ValueError) as e:
        raise common.CheckpointError(f"checkpoint config {config!r:.120} builds no yes/no network "
                                     f"({type(e).__name__}: {e})") from None


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- data: pairs drawn from the world ----------------------------------------------------------------------

def holds(scene, spec):
    """Whether a scene (a list of t2i_world.Obj) shows exactly what `spec` asks for: the checker's rule
    (t2i_world.satisfies) applied to the scene's own objects instead of detections."""
    found = [world.Detection(o.shape, o.colour, o.x * world.BASE, o.y * world.BASE, (0, 0, 0, 0), 0, 1.0)
             for o in scene]
    return world.satisfies(found, spec)


class Pairs:
    """Random (scene, spec, label, kind) examples of one split of the world's prompts ('train' or
    'heldout'): MIX of positives, hard negatives and mismatched prompts, categories balanced (those with
    prompts in the split). kind: 'positive', a hard-negative kind of t2i_world.NEGATIVES, or 'mismatch'.
    relation_share: that share of the examples drawn by MIX is instead a position prompt with, half and half,
    a scene of it or of its flipped relation (the one contrast that MIX alone leaves at chance)."""

    def __init__(self, split, seed, mix=MIX, relation_share=0.0):
        self.specs = {c: [world.parse_prompt(p) for p in ps[split]]
                      for c, ps in world.split_prompts().items() if ps[split]}
        self.categories, self.mix = list(self.specs), np.asarray(mix) / np.sum(mix)
        self.rng, self.relation_share = np.random.default_rng(seed), relation_share

    def spec(self, category=None):
        """A random spec of `category` (default: a random category)."""
        c = category or self.categories[self.rng.integers(len(self.categories))]
        return self.specs[c][self.rng.integers(len(self.specs[c]))]

    def example(self, category=None, kind=None):
        """(scene, spec, label, kind): kind one of 'positive', 'hard' (a random hard kind), a hard kind,
        'mismatch', or None (drawn by MIX)."""
        rng = self.rng
        if self.relation_share and category is None and kind is None and rng.random() < self.relation_share:
            category, kind = "position", ("positive", "flipped_relation")[rng.integers(2)]
        spec = self.spec(category)
        kind = kind or ("positive", "hard", "mismatch")[rng.choice(3, p=self.mix)]
        if kind == "positive":
            scene = world.sample_scene(spec, rng)
        elif kind == "mismatch":
            other = self.spec(spec.category if rng.random() < 0.5 else None)
            scene = world.sample_scene(other, rng)
        else:
            hard = None if kind == "hard" else kind
            scene = world.hard_negative(spec, rng, hard)
            kind = "hard" if hard is None else hard
        return scene, spec, holds(scene, spec), kind

    def batch(self, n, size=32, **kw):
        """A Batch of n examples (example's keywords), rendered at `size`."""
        scenes, specs, labels, kinds = zip(*(self.example(**kw) for _ in range(n)))
        return Batch(world.render_batch(scenes, size), [world.prompt(s) for s in specs],
                     np.asarray(labels, np.float32), list(kinds), list(scenes), list(specs))


class Batch(NamedTuple):
    """Examples of Pairs: uint8 images (n, size, size, 3), prompts [n], labels float32 (n,) (1: the image
    shows the prompt), kinds [n], scenes [n] (lists of t2i_world.Obj) and specs [n]."""
    images: np.ndarray
    prompts: list
    labels: np.ndarray
    kinds: list
    scenes: list
    specs: list


def _cell(ob, grid):
    """(row, column) of the cell of a grid x grid division of the canvas that holds an object's centre."""
    return min(int(ob.y * grid), grid - 1), min(int(ob.x * grid), grid - 1)


def occupancy(scenes, grid):
    """float32 tensor (n, KINDS, grid, grid), the auxiliary target: 1 in channel (shape, colour) of the cell
    of a grid x grid division of the canvas that holds an object's box centre (box centres are >= 11 base px
    apart, so a cell of 4 base px or more holds at most one)."""
    out = np.zeros((len(scenes), KINDS, grid, grid), np.float32)
    for b, scene in enumerate(scenes):
        for o in scene:
            k = world.SHAPES.index(o.shape) * len(world.COLOURS) + world.COLOURS.index(o.colour)
            out[b, k, *_cell(o, grid)] = 1
    return torch.from_numpy(out)


def lookup_targets(scenes, specs, grid):
    """float32 tensor (n, 2, grid * grid), the look-ups' auxiliary target: for the j-th group a prompt
    names, the cells of the scene's objects that fit it (shape, and colour if named), as a distribution
    (a count's objects share it); all zeros (no target) where none fits or the prompt names one group."""
    out = np.zeros((len(scenes), 2, grid, grid), np.float32)
    for b, (scene, spec) in enumerate(zip(scenes, specs)):
        for j, g in enumerate(spec.groups):
            for o in scene:
                if o.shape == g.shape and g.colour in (None, o.colour):
                    out[b, j, *_cell(o, grid)] = 1
    out = out.reshape(len(scenes), 2, -1)
    return torch.from_numpy(out / np.maximum(out.sum(-1, keepdims=True), 1))


def aux_loss(aux, batch):
    """The auxiliary loss of a network's training-only outputs (forward(..., with_aux=True)): BCE of the
    occupancy logits summed over channels and cells, and, for the reward, twice the cross-entropy of the
    look-ups with lookup_targets (where there is one). Means over the batch."""
    occ = aux["occupancy"]                                                           # (B, K, g, g)
    loss = F.binary_cross_entropy_with_logits(occ, occupancy(batch.scenes, occ.shape[-1]), reduction="none")
    loss = loss.sum((1, 2, 3)).mean()
    if "lookup" in aux:
        target = lookup_targets(batch.scenes, batch.specs, 4)                        # (B, 2, 16)
        loss = loss - 2 * (target * F.log_softmax(aux["lookup"], -1)).sum(-1).mean()
    return loss


def gaussian_blur(x, sigma, radius=3):
    """Per-image Gaussian blur: x (B, C, H, W), sigma (B,) px (0: unchanged); a separable (2r + 1) kernel."""
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)            # (K,)
    k = torch.exp(-t ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))              # (B, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)                        # (B C, K)
    h = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="replicate")           # (1, B C, H + 2r, ..)
    h = F.conv2d(h, k[:, None, None, :], groups=B * C)                              # (1, B C, H + 2r, W)
    h = F.conv2d(h, k[:, None, :, None], groups=B * C)                              # (1, B C, H, W)
    return h.view(B, C, H, W)


def augment(x, generator, max_blur=1.0, max_noise=25 / 255, jitter=0.1):
    """What a small diffusion model's samples look like: x (B, 3, H, W) in [-1, 1] with, per image, a
    brightness gain of 1 +- jitter and colour gains of 1 +- jitter / 2, an offset of +- jitter / 5, a
    Gaussian blur of sigma U(0, max_blur) px and Gaussian noise of std U(0, max_noise) (0..1 scale)."""
    B = len(x)
    u = lambda *shape: torch.rand(*shape, generator=generator)                       # noqa: E731
    x01 = (x + 1) / 2                                                                # (B, 3, H, W), [0, 1]
    gain = (1 + jitter * (2 * u(B, 1, 1, 1) - 1)) * (1 + jitter / 2 * (2 * u(B, 3, 1, 1) - 1))
    x01 = x01 * gain + jitter / 5 * (2 * u(B, 3, 1, 1) - 1)
    x01 = gaussian_blur(x01, max_blur * u(B))
    x01 = x01 + max_noise * u(B, 1, 1, 1) * torch.randn(x01.shape, generator=generator)
    return x01.clamp(0, 1) * 2 - 1


# -- training ----------------------------------------------------------------------------------------------

def train_scorer(which, steps=None, seed=None, size=32, batch=None, lr=None, aux_weight=None,
                 relation_share=None, progress=True, evaluated=False):
    """(model in eval mode, report): the `which` network ('reward' or 'judge') trained from scratch for
    `steps` Adam steps on draws of seed `seed` (defaults: TRAINING[which]); report holds the training's
    numbers and, if `evaluated`, evaluate's on clean and degraded images and the images / s."""
    if which not in CONFIGS:
        raise ValueError(f"which must be 'reward' or 'judge', not {which!r}")
    d = TRAINING[which]
    steps, seed = d["steps"] if steps is None else steps, d["seed"] if seed is None else seed
    batch, lr = batch or d["batch"], lr or d["lr"]
    aux_weight = d["aux_weight"] if aux_weight is None else aux_weight
    relation_share = d["relation_share"] if relation_share is None else relation_share
    torch.manual_seed(seed)
    model = build(dict(CONFIGS[which], size=size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    pairs, gen = Pairs("train", seed, relation_share=relation_share), torch.Generator().manual_seed(seed)
    start, losses, aux_losses = time.time(), [], []
    bar = tqdm(range(steps), desc=f"training the {which} yes/no network", disable=not progress)
    model.train()
    for step in bar:
        b = pairs.batch(batch, size)
        x = augment(world.to_tensor(b.images), gen)                                  # (batch, 3, size, size)
        logits, aux = model(x, world.tokenize(b.prompts), with_aux=True)             # (batch,), {name: ...}
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(b.labels))
        extra_loss = aux_loss(aux, b)
        opt.zero_grad(set_to_none=True)
        (loss + aux_weight * extra_loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step()
        losses.append(loss.item()), aux_losses.append(extra_loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", aux=f"{np.mean(aux_losses[-50:]):.3f}")
    model.eval()
    report = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "size": size,
              "relation_share": relation_share,
              "final_loss": float(np.mean(losses[-100:])) if losses else float("nan"),
              "final_aux_loss": float(np.mean(aux_losses[-100:])) if losses else float("nan"),
              "train_wall_s": round(time.time() - start, 1), "n_params": n_params(model)}
    if evaluated:
        report["eval_clean"] = evaluate(model, size)
        report["eval_noisy"] = evaluate(model, size, noisy=True)
        report["images_per_s"] = round(throughput(model, size))
    return model, report


# -- evaluation --------------------------------------------------------------------------------------------

def roc_auc(pos, neg):
    """Exact ROC AUC of scores of positives against negatives: P(pos > neg) + P(pos == neg) / 2, by ranks
    (ties averaged; the Mann-Whitney U statistic over n_pos n_neg)."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def _scores(model, images, prompts, size, noisy, seed):
    """P(yes) (N,) numpy of uint8 images rendered at `size`, optionally degraded by augment."""
    x = world.to_tensor(images)
    if noisy:
        x = augment(x, torch.Generator().manual_seed(seed), jitter=0.0)
    return Scorer(model, {"size": size})(x, prompts).numpy()


def eval_set(split, seed, n_pos=200, n_per_kind=200, n_mismatch=200, size=32):
    """{category: {kind: (images, prompts, labels)}} of one split: positives, every hard-negative kind and
    mismatched prompts of each category that has prompts in the split; deterministic in `seed`."""
    pairs, out = Pairs(split, seed), {}
    for c in pairs.categories:
        counts = dict(positive=n_pos, mismatch=n_mismatch, **{k: n_per_kind for k in world.NEGATIVES[c]})
        out[c] = {k: pairs.batch(n, size, category=c, kind=k)[:3] for k, n in counts.items()}
    return out


def evaluate(model, size=32, seed=1234, noisy=False, sets=None):
    """ROC AUC and accuracy at 0.5 of a model on both splits. Per category: positives against each hard
    kind, all hard negatives, mismatches; overall: all positives against all hard negatives / mismatches.
    Examples whose label disagrees with their kind (a mismatch that fits) count by their label."""
    report = {}
    for split in ("heldout", "train"):
        data = (sets or {}).get(split) or eval_set(split, seed, size=size)
        scores, labels, rows = {}, {}, {}
        for c, kinds in data.items():
            for k, (images, prompts, y) in kinds.items():
                scores[c, k], labels[c, k] = _scores(model, images, prompts, size, noisy, seed), y
        pos_all = np.concatenate([scores[c, "positive"] for c in data])
        hard_all, mis_all = [], []
        for c, kinds in data.items():
            pos = np.concatenate([scores[c, k][labels[c, k] == 1] for k in kinds])
            row = {}
            for k in kinds:
                if k != "positive":
                    row[k] = roc_auc(pos, scores[c, k][labels[c, k] == 0])
            hard = np.concatenate([scores[c, k][labels[c, k] == 0] for k in world.NEGATIVES[c]])
            row["hard"] = roc_auc(pos, hard)
            hard_all.append(hard), mis_all.append(scores[c, "mismatch"][labels[c, "mismatch"] == 0])
            all_s = np.concatenate([scores[c, k] for k in kinds])
            all_y = np.concatenate([labels[c, k] for k in kinds])
            row["accuracy"] = float(((all_s >= 0.5) == (all_y == 1)).mean())
            rows[c] = row
        all_s = np.concatenate(list(scores.values()))
        all_y = np.concatenate(list(labels.values()))
        report[split] = {"hard_auc": roc_auc(pos_all, np.concatenate(hard_all)),
                         "mismatch_auc": roc_auc(pos_all, np.concatenate(mis_all)),
                         "accuracy": float(((all_s >= 0.5) == (all_y == 1)).mean()),
                         "per_category": rows}
    return report


@torch.no_grad()
def agreement(reward, judge, n=2000, seed=4321, size=32):
    """How the reward and the judge agree on degraded held-out images (blur 0-1 px, noise 0-25/255): the
    fraction of equal decisions at 0.5, the Spearman correlation of their scores, and the judge's ROC AUC
    (hard negatives and mismatches) with the reward's decisions as labels."""
    images, prompts, labels = Pairs("heldout", seed).batch(n, size)[:3]
    x = augment(world.to_tensor(images), torch.Generator().manual_seed(seed), jitter=0.0)
    r, j = reward(x, prompts).numpy(), judge(x, prompts).numpy()
    spearman = float(np.corrcoef(rankdata(r), rankdata(j))[0, 1])
    return {"n": n, "decisions_agree": float(((r >= 0.5) == (j >= 0.5)).mean()), "spearman": spearman,
            "reward_accuracy": float(((r >= 0.5) == (labels == 1)).mean()),
            "judge_accuracy": float(((j >= 0.5) == (labels == 1)).mean())}


@torch.no_grad()
def throughput(model, size=32, n=4096, batch=SCORE_BATCH):
    """Images per second of a forward pass on the current thread settings (best of 3)."""
    x = torch.rand(batch, 3, size, size) * 2 - 1
    tokens = world.tokenize(["a purple square left of a yellow triangle"] * batch)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            model(x, tokens)
        best = min(best, time.perf_counter() - t)
    return max(1, n // batch) * batch / best


# -- the scorer --------------------------------------------------------------------------------------------

class Scorer:
    """scorer(images (B, 3, H, W) float in [-1, 1], prompts [B str]) -> P(yes) (B,) float32 on the images'
    device, under no_grad, in batches of SCORE_BATCH; images of another size are resized (bilinear,
    antialiased) to the network's. Out-of-grammar prompts raise tokenize's ValueError."""

    def __init__(self, model, config, extra=None, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.config, self.extra, self.device, self.size = config, extra, torch.device(device), config["size"]

    @torch.no_grad()
    def __call__(self, images, prompts):
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != len(images):
            raise ValueError(f"expected images (B, 3, H, W) and B prompts, got {tuple(images.shape)} and "
                             f"{len(prompts)} prompts")
        tokens = world.tokenize(list(prompts))                                       # (B, L); may raise
        out = []
        for i in range(0, len(images), SCORE_BATCH):
            x = images[i:i + SCORE_BATCH].to(self.device, torch.float32).clamp(-1, 1)  # (b, 3, H, W)
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)                               # (b, 3, size, size)
            out.append(torch.sigmoid(self.model(x, tokens[i:i + SCORE_BATCH].to(self.device)).float()))
        return torch.cat(out).to(images.device) if out else torch.zeros(0, device=images.device)


def _ship(which, path):
    """Train the `which` network with TRAINING's defaults, evaluate it and write its checkpoint at `path`
    (the judge's also records its agreement with the reward, when the reward's checkpoint loads)."""
    print(f"t2i_vqa: {path} not found; training the {which} network once "
          f"({TRAINING[which]['steps']} steps, 10-40 min on one CPU thread)", file=sys.stderr)
    start = time.time()
    model, report = train_scorer(which, evaluated=True)
    config = dict(CONFIGS[which], which=which, size=report["size"], steps=report["steps"],
                  seed=report["seed"], batch=report["batch"], lr=report["lr"],
                  aux_weight=TRAINING[which]["aux_weight"], mix=list(MIX),
                  relation_share=report["relation_share"])
    extra = {"training": {
        "command": f"t2i_vqa.train_scorer({which!r}) via load_scorer (argv: {' '.join(sys.argv)[:200]})",
        "hardware": f"{platform.machine()} {platform.processor() or platform.platform()}, torch "
                    f"{torch.__version__}, {torch.get_num_threads()} thread(s), cpu",
        **{k: report[k] for k in ("train_wall_s", "final_loss", "final_aux_loss", "n_params")}},
        **{k: report[k] for k in ("eval_clean", "eval_noisy", "images_per_s")}}
    if which == "judge" and os.path.isfile(CHECKPOINTS["reward"]):
        try:
            extra["agreement_with_reward"] = agreement(load_scorer("reward"), Scorer(model, config))
        except common.CheckpointError as e:                  # an outdated reward: no agreement recorded
            print(f"t2i_vqa: no agreement recorded ({e})", file=sys.stderr)
    extra["training"]["total_wall_s"] = round(time.time() - start, 1)
    common.save_checkpoint(path, {"model": model.state_dict()}, config, extra)
    e = extra["eval_clean"]["heldout"]
    print(f"t2i_vqa: {which} held-out ROC AUC hard {e['hard_auc']:.4f} mismatch {e['mismatch_auc']:.4f}; "
          f"saved {path}", file=sys.stderr)
    return model, config, extra


def load_scorer(which="reward", path=None, device="cpu"):
    """The `which` ('reward' or 'judge') scorer (Scorer) from `path` (default CHECKPOINTS[which]), trained
    and written there once if the file is missing. A corrupt or mismatched checkpoint raises
    common.CheckpointError with a one-line message."""
    if which not in CONFIGS:
        raise ValueError(f"which must be 'reward' or 'judge', not {which!r}")
    path = path or CHECKPOINTS[which]
    if not path.startswith("hf:") and not os.path.exists(path):
        model, config, extra = _ship(which, path)
        return Scorer(model, config, extra, device)
    ckpt = common.load_checkpoint(path)
    config = ckpt["config"]
    if config.get("which") != which:
        raise common.CheckpointError(f"{path!r} holds a {config.get('which') or 'non-t2i_vqa'} checkpoint, "
                                     f"not the {which}")
    model = build(config)
    common.load_state(model, ckpt["state_dicts"].get("model", {}), f"{which} checkpoint {path!r}")
    return Scorer(model, config, ckpt.get("extra"), device)
