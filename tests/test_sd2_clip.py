"""sd2_clip.py against transformers: the text encoder's state_dict layout (SD2's full config, on the
meta device) and outputs (small random configs), the tokenizer's ids on 200 compositional prompts with CLIP's
real BPE vocabulary (read from the open-clip-torch wheel, never imported), and the pre-tokenizer on every
assigned BMP character."""
import glob
import gzip
import json
import os
import random
import unicodedata
import zipfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sd2_clip  # noqa: E402
from sd2_clip import SD2_TEXT_CONFIG, CLIPTextEncoder, CLIPTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps", "projection_dim")


def hf_config(cfg):
    return transformers.CLIPTextConfig(**{k: cfg[k] for k in TEXT_KEYS if k in cfg})


def hub_keys(sd):
    """transformers >= 5 drops the Hub files' `text_model.` prefix on load (its conversion_mapping.py:
    CLIPTextModel -> PrefixChange(prefix_to_remove="text_model")); the files, and we, keep it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


# -- text encoder --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_text_encoder_matches_transformers_clip_text_model(act):
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=77, vocab_size=1000, hidden_act=act, layer_norm_eps=1e-5)
    ref = transformers.CLIPTextModel._from_config(hf_config(cfg), attn_implementation="eager").eval()
    with torch.no_grad():                          # move the layer norms off (1, 0) so they are tested too
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = CLIPTextEncoder.from_config(cfg).eval()
    ours.load_state_dict(hub_keys(ref.state_dict()), strict=True)
    for L in (77, 12):
        ids = torch.randint(0, 1000, (3, L))
        with torch.no_grad():
            want = ref(input_ids=ids).last_hidden_state                                   # (3, L, 64)
            got = ours(ids)
        assert got.shape == want.shape == (3, L, 64)
        assert (got - want).abs().max() < 1e-4


def test_text_encoder_state_dict_equals_transformers_at_sd2_config():
    with torch.device("meta"):
        ours = CLIPTextEncoder.from_config(SD2_TEXT_CONFIG)
        ref = transformers.CLIPTextModel(hf_config(SD2_TEXT_CONFIG))
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in hub_keys(ref.state_dict()).items()}
    assert got == want
    assert len(got) == 2 + 16 * 23 + 2         # token + position embeddings, 16 per layer, final norm
    assert got["text_model.embeddings.token_embedding.weight"] == (49408, 1024)
    assert got["text_model.encoder.layers.22.mlp.fc1.weight"] == (4096, 1024)


def test_hub_state_dict_drops_only_position_ids():
    cfg = dict(SD2_TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, vocab_size=50)
    enc = CLIPTextEncoder.from_config(cfg)
    sd = dict(enc.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    enc.load_hub_state_dict(sd)
    with pytest.raises(RuntimeError):
        enc.load_hub_state_dict(dict(sd, **{"text_model.extra": torch.zeros(1)}))
    with pytest.raises(ValueError):
        CLIPTextEncoder.from_config(dict(cfg, hidden_act="relu"))


# -- tokenizer -----------------------------------------------------------------------------------------------

def open_clip_wheel():
    path = os.environ.get("GRAFT_OPEN_CLIP_WHEEL")
    if path:
        return path if os.path.exists(path) else pytest.skip(f"GRAFT_OPEN_CLIP_WHEEL={path} does not exist")
    wheels = sorted(glob.glob(os.path.join(ROOT, ".ci", "wheels", "open_clip_torch-*.whl")))
    if not wheels:
        pytest.skip("CLIP's BPE vocabulary comes from the open-clip-torch wheel: set GRAFT_OPEN_CLIP_WHEEL "
                    "or run `pip download --no-deps open_clip_torch -d .ci/wheels`")
    return wheels[-1]


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A Hub-style tokenizer/ folder made from open_clip/bpe_simple_vocab_16e6.txt.gz the way CLIP's
    SimpleTokenizer builds its vocabulary: 256 byte characters, the same with '</w>', one per merge,
    the two specials."""
    with zipfile.ZipFile(open_clip_wheel()) as z:
        lines = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


def prompts(n=200, seed=0):
    """GenAI-Bench-style compositional prompts: counts (words and digits), colours, relations, possessives and
    contractions, punctuation, uppercase, accents, odd whitespace, and long ones past 77 tokens."""
    r = random.Random(seed)
    counts = ["one", "two", "three", "four", "five", "a dozen", "2", "3", "7", "12", "100", "1,000"]
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "turquoise", "magenta"]
    things = ["cube", "sphere", "cat", "dog", "teapot", "bicycle", "umbrella", "giraffe", "lighthouse",
              "robot"]
    rels = ["to the left of", "on top of", "behind", "next to", "under", "inside", "reflected in", "chasing"]
    extras = ["the dog's ball", "it's raining", "they're smiling", "we'll see", "I'd say", "you've got mail",
              "I'm here", "don't stop", "a cat-shaped cloud", "black-and-white", "\"Hello, World!\"",
              "(no text)",
              "50% off", "$5 bill", "#1 fan", "e-mail@home", "3.14159", "snake_case__name", "wait...what?!",
              "café in Zürich", "naïve art", "A NASA ROCKET", "Van Gogh's Starry Night", "2 + 2 = 4", "1990s",
              "rock 'n' roll", "x;y:z", "—an em dash—", "'quoted'", "O'Brien's pub"]
    out = []
    for i in range(n):
        c1, c2 = r.choice(counts), r.choice(counts)
        p = f"{c1} {r.choice(colours)} {r.choice(things)}s {r.choice(rels)} {c2} {r.choice(colours)} " \
            f"{r.choice(things)}s, {r.choice(extras)}"
        if i % 5 == 0:
            p = p.upper()
        if i % 7 == 0:
            p = "  " + p.replace(" ", "   ", 2) + "\t\n"
        if i % 10 == 3:                                          # well past 75 tokens: truncation
            p = " and ".join([p] + [f"{r.choice(counts)} {r.choice(colours)} {r.choice(things)}s"
                                    for _ in range(25)])
        out.append(p)
    return out


@pytest.fixture(scope="module")
def reference(hub_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(hub_folder))           # pads with <|endoftext|>


def reference_ids(ref, texts):
    """OpenCLIP's ids from transformers' tokenizer: pad with <|endoftext|>, then write "!" (0) after the end
    token. Asking transformers for pad_token="!" instead makes "!" special inside the text as well (below)."""
    ids = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    after_eos = (ids == 49407).long().cumsum(1) - (ids == 49407).long() > 0                # (B, 77)
    return ids.masked_fill(after_eos, 0)


def test_bytes_to_unicode_is_gpt2s_table():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert sd2_clip.bytes_to_unicode() == bytes_to_unicode()


def test_tokenizer_ids_equal_transformers_on_200_prompts(hub_folder, reference):
    tok = CLIPTokenizer(hub_folder / "vocab.json", hub_folder / "merges.txt", pad_token="!")
    texts = prompts()
    ids = tok(texts)                                                                      # (200, 77)
    assert ids.dtype == torch.long and ids.shape == (200, 77)
    assert torch.equal(ids, reference_ids(reference, texts))
    assert sum(len(tok.encode(t)) > 75 for t in texts) >= 15     # the truncation path is exercised
    assert (ids[:, 0] == 49406).all() and ((ids == 49407).sum(1) == 1).all()
    long = max(texts, key=lambda t: len(tok.encode(t)))
    assert tok([long])[0, -1] == 49407
    short = tok(["a photo of a cat"])[0]
    assert short[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (short[7:] == 0).all()


def test_html_entities_are_unescaped_as_clip_does(hub_folder, reference):
    # transformers' CLIPTokenizer skips CLIP's html.unescape; SD2's OpenCLIP tokenizer does not
    tok = CLIPTokenizer.from_folder(hub_folder)
    assert torch.equal(tok(["salt &amp; pepper &amp;amp; a &quot;dog&quot;"]),
                       reference_ids(reference, ['salt & pepper & a "dog"']))


def test_exclamation_marks_are_text_as_in_open_clip_not_padding(hub_folder):
    # diffusers#4153: with the Hub's pad_token "!", transformers turns every "!" of the prompt into the pad
    # id; OpenCLIP, which SD2 was trained with, tokenizes "! !! !!!" as below (the output)
    tok = CLIPTokenizer.from_folder(hub_folder)
    assert tok(["! !! !!!"])[0, :8].tolist() == [49406, 256, 748, 995, 49407, 0, 0, 0]
    hf = transformers.CLIPTokenizer.from_pretrained(str(hub_folder), pad_token="!")
    assert hf(["! !! !!!"]).input_ids[0][:8] == [49406, 0, 0, 0, 0, 0, 0, 49407]


def test_from_folder_reads_pad_token_and_max_length(hub_folder, reference, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hub_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False}}))
    texts = prompts(40, seed=1)
    sd2 = CLIPTokenizer.from_folder(tmp_path)
    assert sd2.pad == 0 and torch.equal(sd2(texts), reference_ids(reference, texts))
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 40,
                                                                "pad_token": "<|endoftext|>"}))
    sd1 = CLIPTokenizer.from_folder(tmp_path)                                   # SD1 pads with the end token
    assert sd1.pad == 49407 and sd1(texts).shape == (40, 40) and (sd1(texts)[:, -1] == 49407).all()


def test_pretokenizer_matches_clip_regex_on_every_assigned_bmp_character():
    tokenizers = pytest.importorskip("tokenizers")
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True)
    # Unicode categories are Python's (its re and str methods agree with them); whitespace is collapsed first
    chars = [chr(i) for i in range(0x10000)
             if unicodedata.category(chr(i)) not in ("Cs", "Cn") and not chr(i).isspace()]
    assert sum(unicodedata.category(c) in ("No", "Nl") for c in chars) > 300       # ², ½, Ⅻ, ...
    text = " ".join(c + c + "a" + c + "7" + c + "," + c for c in chars)   # next to letters, digits, punct
    assert list(sd2_clip.pieces(text)) == [p for p, _ in split.pre_tokenize_str(text)]
