"""sd2_clip.py — Stable Diffusion 2's text side from scratch: CLIP's byte-level BPE tokenizer and CLIP's
text transformer, laid out so that the Hub's diffusers folders `tokenizer/` (vocab.json, merges.txt) and
`text_encoder/` (config.json, model.safetensors) of stabilityai/stable-diffusion-2-1(-base) load as they are.

SD2 conditions its UNet on the text tower of OpenCLIP ViT-H/14 (Cherti et al., "Reproducible scaling laws
for contrastive language-image learning", CVPR 2023; trained on LAION-2B) in place of SD1's OpenAI ViT-L/14,
and takes the tokens of its penultimate layer after the final layer norm: the UNet cross-attends to all 77
token states (B, 77, 1024), never to the pooled, projected embedding. The diffusers conversion keeps that by
shipping 23 of ViT-H's 24 layers, so `CLIPTextEncoder(SD2_TEXT_CONFIG)` ends exactly where SD2 reads.

    tok = CLIPTokenizer.from_folder("sd2/tokenizer")
    enc = CLIPTextEncoder.from_config(json.load(open("sd2/text_encoder/config.json")))
    enc.load_hub_state_dict(safetensors.torch.load_file("sd2/text_encoder/model.safetensors"))
    ctx = enc(tok(["a red cube to the left of two blue spheres"]))      # (1, 77, 1024)
"""
import functools
import html
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# the Hub's text_encoder/config.json of stabilityai/stable-diffusion-2-1-base (a CLIPTextModel)
SD2_TEXT_CONFIG = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=1024,
                       intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
                       projection_dim=512, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0,
                       initializer_range=0.02, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                       torch_dtype="float32")


# -- tokenizer -----------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """CLIP's (GPT-2's) reversible byte -> printable character table: the 188 printable Latin-1 bytes map to
    themselves, the other 68 to chr(256 + n), so BPE never sees whitespace or control characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# CLIP's pre-tokenizer pattern
#     <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
# in stdlib `re`, which has no \p: letters are word characters that are neither digits nor "_", and "_" joins
# the punctuation runs. re's \d is Unicode Nd only, so the other numerals (², ½, Ⅻ: \w, not \d, not alpha)
# land in the letter runs; `pieces` splits them out, one piece each, as [\p{N}] does.
PAT = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def pieces(text):
    """text -> CLIP's pre-tokens, in order."""
    for piece in PAT.findall(text):
        if piece.isalpha() or not piece.isalnum() or piece.isdecimal():
            yield piece
        else:                                      # a letter run holding numerals: split them out, one each
            yield from "".join(c if c.isalpha() else f" {c} " for c in piece).split()


def clean(text):
    """CLIP's basic_clean + whitespace_clean without ftfy: html entities unescaped (twice, as CLIP does),
    whitespace runs collapsed, stripped, lowercased."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """prompts -> ids (B, max_length): [<|startoftext|>] + BPE tokens (truncated to max_length - 2) +
    [<|endoftext|>], right-padded with `pad_token` ("!", id 0, for SD2; SD1 pads with <|endoftext|>). A "!"
    in the prompt stays text, as in OpenCLIP, which SD2 was trained with; transformers' tokenizer with the
    Hub's pad token "!" reads it as padding (id 0) instead (diffusers issue #4153)."""

    def __init__(self, vocab_path, merges_path, pad_token="!", max_length=77):
        with open(vocab_path, encoding="utf-8") as f:
            self.encoder = json.load(f)                                   # token string -> id
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}                 # lower rank merges first
        self.byte_encoder = bytes_to_unicode()
        self.bos, self.eos = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pad, self.max_length = self.encoder[pad_token], max_length
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    @classmethod
    def from_folder(cls, folder):
        """A Hub `tokenizer/` folder: vocab.json, merges.txt, and the pad token and model_max_length from
        special_tokens_map.json / tokenizer_config.json where present."""
        kw = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
                if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10 ** 6:
                    kw["max_length"] = cfg["model_max_length"]
                pad = cfg.get("pad_token")
                if pad is not None:
                    kw["pad_token"] = pad["content"] if isinstance(pad, dict) else pad
        return cls(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), **kw)

    def _bpe(self, token):
        """One pre-token (byte-mapped) -> its space-separated BPE pieces; the last symbol carries '</w>'."""
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):                                          # merge every occurrence of `best`
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return " ".join(word)

    def encode(self, text):
        """text -> BPE ids, no start/end tokens, no truncation."""
        ids = []
        for token in pieces(clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self.bpe(token).split(" ")]
        return ids

    def __call__(self, prompts):
        L = self.max_length
        rows = [[self.bos] + self.encode(p)[:L - 2] + [self.eos] for p in prompts]
        return torch.tensor([r + [self.pad] * (L - len(r)) for r in rows], dtype=torch.long)   # (B, L)


# -- text encoder --------------------------------------------------------------------------------------------
# Attribute names are transformers' CLIPTextModel's, so the Hub's state_dict keys are our module paths.

ACT = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}   # quick_gelu: OpenAI CLIP's


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embedding = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)                              # (L,)
        return self.token_embedding(ids) + self.position_embedding(pos)                   # (B, L, D)


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.heads, -1).transpose(1, 2)                    # (B, h, L, D/h)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)                      # (B, h, L, D/h)
        return self.out_proj(a.transpose(1, 2).reshape(B, L, D))                         # (B, L, D)


class MLP(nn.Module):
    def __init__(self, d, inner, act):
        super().__init__()
        self.act, self.fc1, self.fc2 = ACT[act], nn.Linear(d, inner), nn.Linear(inner, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c):
        super().__init__()
        d, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-5)
        self.self_attn = SelfAttention(d, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, c["intermediate_size"], c.get("hidden_act", "quick_gelu"))
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """ids (B, L) -> last_hidden_state (B, L, D): token + position embeddings, num_hidden_layers causal
    pre-norm layers, final layer norm (transformers' CLIPTextModel without the pooler). At SD2_TEXT_CONFIG
    that is OpenCLIP ViT-H's penultimate layer through the final layer norm: the diffusers config keeps 23 of
    ViT-H's 24 layers. The causal mask is the whole mask: SD2 pads with "!" and attends to the padding too, as
    it was trained (positions before the padding never see it)."""

    def __init__(self, config):
        super().__init__()
        if config.get("hidden_act", "quick_gelu") not in ACT:
            raise ValueError(f"hidden_act {config['hidden_act']!r} (this module has {sorted(ACT)})")
        if config["hidden_size"] % config["num_attention_heads"]:
            raise ValueError(f"hidden_size {config['hidden_size']} not divisible by the heads")
        self.config = c = dict(config)
        # plain containers, there only for the checkpoint's key paths:
        # text_model.{embeddings, encoder.layers.i, final_layer_norm}
        self.text_model = nn.Module()
        self.text_model.embeddings = Embeddings(c)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.text_model.final_layer_norm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-5))

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def forward(self, ids):
        m = self.text_model
        x = m.embeddings(ids)                                                             # (B, L, D)
        for layer in m.encoder.layers:
            x = layer(x)                                                                  # (B, L, D)
        return m.final_layer_norm(x)                                                      # (B, L, D)

    @staticmethod
    def hub_state_dict(sd):
        """A Hub text_encoder state_dict ready for strict loading: older files carry transformers' buffer
        `text_model.embeddings.position_ids` (an arange), the one key dropped."""
        return {k: v for k, v in sd.items() if k != "text_model.embeddings.position_ids"}

    def load_hub_state_dict(self, sd):
        return self.load_state_dict(self.hub_state_dict(sd), strict=True)
