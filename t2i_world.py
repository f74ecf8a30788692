"""t2i_world.py — the compositional world of graft_t2i.py: small rendered scenes, a prompt grammar over
GenEval's six task categories, a fixed split of compositions, hard negatives, and a programmatic checker
(GenEval's analogue) that decides whether an image shows exactly what its prompt says.

The world. A scene is a list of objects (shape, colour, size, x, y) on a black background (black, so that the
checker can divide the dimming of a blurred edge out of its colour). Five shapes, each filling a square box:
circle, square, triangle (apex up), diamond, cross (a plus, arms a third of its width in whole pixels); six
colours (PALETTE): red, orange, yellow, green, blue, purple; two sizes, small / large = 9 / 13 px wide on the
default 32 px canvas (18 / 26 px at 64). Size is a nuisance: no prompt names it. Geometry lives on the 32 px
base canvas (whole-pixel corners, exact at 32 and 64 px, rounded at 48): boxes stay GAP = 2 px apart, so
objects never touch. render() draws with PIL at 8x and box-filters down (anti-aliased edges).

The grammar, one category per line (canonical text; parse_prompt also takes any case and a / an either way):

    single              "a circle"                             one object, a circle, any colour
    two_objects         "a circle and a square"                two objects, a circle and a square
    counting            "three green triangles"                n objects (n = 2, 3, 4), all green triangles
    colours             "a yellow square"                      one object, a yellow square
    position            "a red circle left of a blue square"   these two, the circle left of the square
    colour_attribution  "a purple square and a yellow circle"  these two objects, colours bound to shapes

Every scene holds what its prompt names and nothing else, and the checker demands exactly that: an extra
object, a missing one, a wrong shape, colour or count all fail. The two objects of a two-object prompt have
different shapes (so the checker tells them apart by shape); colour_attribution's also have different colours
(so that swapping them is an error); position's colours are free. `A left of B` holds when the offset of A's
box centre from B's points within 45 degrees of left (y grows downwards: `above` is up), so exactly one
relation holds off the diagonals; sampled scenes keep a margin (RELATION_RATIO).

The split (split_prompts). Prompts of one `composition` (the order-free content: "a circle and a square" / "a
square and a circle"; "A right of B" / "B left of A") share a split. With the indices of the words in SHAPES
and COLOURS (s, c) and an object's index sum i = c + s, a composition is held out iff

    single              never (five prompts; a shape alone is no composition)    train / held-out: 5 / 0
    two_objects         (s1 + s2) % 5 == 0: {square, cross}, {triangle, diamond}                    16 / 4
    counting            (n + c + s) % 5 == 0: one shape per (count, colour)                         72 / 18
    colours             (c + s) % 5 == 0: one shape per colour                                      24 / 6
    position            (i_A + 2 i_B + v) % 5 == 0 as "A left of B" / "A above B" (v 1)        2304 / 576
    colour_attribution  (i_1 + i_2) % 5 == 0                                                   480 / 120

so a held-out prompt is a new combination of words that all appear in its category's training prompts.

The checker (detect, check). A pixel's colour is the palette colour nearest in chroma (RGB over its largest
channel, so a dim edge keeps its hue) of its 3 x 3 mean; it is foreground when its largest channel is >=
FG_LEVEL x that colour's. 8-connected components of one colour smaller than MIN_AREA (scaled with the canvas)
are noise. A component's colour is None when its mean chroma is over COLOUR_TOL from the palette's; its shape
is that of the template (each shape rendered at every width, sharp and blurred (BLURS), thresholded like an
image, with a box within 1 px of the component's) whose coverage best matches the component's by soft IoU,
the two lined up by their boxes; None below SHAPE_MIN_IOU or for a box longer than MAX_ASPECT x its width.
Unknown shapes and colours match nothing.
Measured: 100% on clean renders at 32 / 48 / 64 px and on blur 0.5 px + noise std 10 / 255; ~99% at blur
0.7 + std 20; hard negatives rejected 100% (>= 99.7% at blur 0.7 + std 20). At blur 1 px + std 30 small
shapes blend (circle / square, diamond / cross) and about half the scenes fail.
"""
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

import common

# -- the world ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}
PALETTE = {"red": (225, 35, 35), "orange": (250, 140, 20), "yellow": (240, 225, 35), "green": (40, 210, 60),
           "blue": (40, 85, 245), "purple": (160, 55, 225)}     # chroma distances >= 0.38 (orange-yellow)
COLOURS = tuple(PALETTE)
COUNTS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single", "two_objects", "counting", "colours", "position", "colour_attribution")

BASE = 32                  # scene geometry is in pixels of a 32 px canvas, scaled for other resolutions
SIZES = {"small": 9, "large": 13}              # box width, base px (18 / 26 px at 64 px)
GAP = 2                    # min distance between two boxes, base px (positions are whole base px)
BORDER = 0                 # min distance from a box to the edge of the canvas, base px
RELATION_RATIO = 1.25      # sampled position scenes: |offset on its axis| >= 1.25 |offset on the other|
SUPERSAMPLE = 8            # shapes are drawn at 8x and box-filtered down (anti-aliased edges)

# the checker's thresholds (module docstring)
FG_LEVEL = 0.45            # foreground: brightest channel >= 0.45 x that of the nearest palette colour
BLURS = (0.0, 0.5, 0.8, 1.1)   # px; shape templates are also rendered blurred, as a diffusion model draws
MIN_AREA = 12              # px at 32 x 32 (scaled with the canvas area); a small triangle covers ~40
COLOUR_TOL = 0.25          # mean chroma distance of a component to its palette colour
SHAPE_MIN_IOU = 0.65       # best template soft IoU below this: shape None (clean renders score 1)
MAX_ASPECT = 1.5           # a box longer than 1.5 x its width: shape None (every shape fills a square box)
SOFT_FLOOR = 0.15          # coverage below this is background noise, not the object's blurred edge

_POLYGONS = {"square": [(0, 0), (1, 0), (1, 1), (0, 1)],      # outlines in a unit box, y down
             "triangle": [(0.5, 0), (1, 1), (0, 1)],
             "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]}

NEGATIVES = {      # the kinds of hard negative of each category (hard_negative)
    "single": ("wrong_shape", "missing_object", "extra_object"),
    "two_objects": ("wrong_shape", "missing_object", "extra_object"),
    "counting": ("wrong_count", "wrong_shape", "wrong_colour"),
    "colours": ("wrong_colour", "wrong_shape", "extra_object"),
    "position": ("flipped_relation", "missing_object", "wrong_colour"),
    "colour_attribution": ("swapped_colours", "wrong_colour", "missing_object"),
}


@dataclass(frozen=True)
class Obj:
    """One object of a scene: size 'small' or 'large'; (x, y) its box centre, a fraction of the canvas."""
    shape: str
    colour: str
    size: str
    x: float
    y: float


# -- rendering ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def shape_mask(shape, d):
    """Coverage (d, d) float32 in [0, 1] of `shape` filling a d x d box: drawn by PIL at SUPERSAMPLE x, then
    box-filtered down. The cross's arms are whole pixels, d - 2 round(d / 3) wide (3 / 5 px at 9 / 13), so
    that no edge is half covered. Cached and read-only."""
    n, ss = d * SUPERSAMPLE, SUPERSAMPLE
    im = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([0, 0, n - 1, n - 1], fill=255)
    elif shape == "cross":
        m = round(d / 3) * ss                                            # the margin beside an arm
        draw.rectangle([m, 0, n - m - 1, n - 1], fill=255)
        draw.rectangle([0, m, n - 1, n - m - 1], fill=255)
    else:
        draw.polygon([(u * n - 0.5, v * n - 0.5) for u, v in _POLYGONS[shape]], fill=255)
    mask = np.asarray(im.resize((d, d), Image.BOX), np.float32) / 255     # (d, d)
    mask.flags.writeable = False
    return mask


def pixel_box(ob, size):
    """(d, x0, y0): the width and top-left corner in pixels of object `ob` on a size x size canvas (exact for
    multiples of BASE; otherwise rounded, GAP shrinking by at most 1 px)."""
    d = max(3, round(SIZES[ob.size] * size / BASE))
    x0 = min(max(round(ob.x * size - d / 2), 0), size - d)
    y0 = min(max(round(ob.y * size - d / 2), 0), size - d)
    return d, x0, y0


def render(scene, size=32):
    """uint8 (size, size, 3) image of a scene: each object's anti-aliased shape in its colour on black."""
    img = np.zeros((size, size, 3), np.float32)                          # (size, size, 3), the background
    for ob in scene:
        d, x0, y0 = pixel_box(ob, size)
        a = shape_mask(ob.shape, d)[..., None]                           # (d, d, 1)
        patch = img[y0:y0 + d, x0:x0 + d]                                # (d, d, 3)
        img[y0:y0 + d, x0:x0 + d] = (1 - a) * patch + a * np.asarray(PALETTE[ob.colour], np.float32)
    return np.round(img).astype(np.uint8)


def render_batch(scenes, size=32):
    """uint8 (B, size, size, 3) images of a list of scenes."""
    return np.stack([render(s, size) for s in scenes])


def render_prompts(prompts, rng, size=32):
    """Images (B, 3, size, size) in [-1, 1] of random scenes that satisfy the prompts."""
    return to_tensor(render_batch([sample_scene(parse_prompt(p), rng) for p in prompts], size))


def to_tensor(images):
    """uint8 (B, H, W, 3) images (array or list) -> float32 tensor (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)        # (B, H, W, 3)
    return x.permute(0, 3, 1, 2).contiguous() / 127.5 - 1


def to_uint8(x):
    """A tensor (B, 3, H, W) in [-1, 1] (clipped) -> uint8 (B, H, W, 3) numpy images; to_tensor's inverse."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


# -- prompts and specs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """`count` objects of one shape, all of `colour` (None: any palette colour, drawn per object)."""
    shape: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: its category, the groups it names in prompt order and, for position, the
    relation of the first group's object to the second's."""
    category: str
    groups: tuple
    relation: str | None = None


def _phrase(g):
    """The noun phrase of a group: 'a circle', 'an orange square', 'three green triangles'."""
    if g.count > 1:
        return f"{COUNTS[g.count]} {g.colour} {PLURAL[g.shape]}"
    words = f"{g.colour} {g.shape}" if g.colour else g.shape
    return ("an " if words[0] in "aeiou" else "a ") + words


def prompt(spec):
    """The canonical text of a spec."""
    first = _phrase(spec.groups[0])
    if len(spec.groups) == 1:
        return first
    return f"{first} {spec.relation or 'and'} {_phrase(spec.groups[1])}"


def _parse_phrase(words, text):
    """A Group from the words of one noun phrase of `text`; ValueError naming the problem."""
    if not words:
        raise ValueError(f"{text!r}: a noun phrase is empty")
    count_of = {w: n for n, w in COUNTS.items()}
    if words[0] in count_of:
        singular = {p: s for s, p in PLURAL.items()}
        if len(words) != 3 or words[1] not in PALETTE or words[2] not in singular:
            raise ValueError(f"{text!r}: a count is followed by a colour and a plural shape, as in "
                             f"'three green triangles' (colours {', '.join(COLOURS)})")
        return Group(singular[words[2]], words[1], count_of[words[0]])
    if words[0] not in ("a", "an"):
        raise ValueError(f"{text!r}: a noun phrase starts with 'a', 'an' or a count "
                         f"({', '.join(count_of)}), not {words[0]!r}")
    if len(words) not in (2, 3) or words[-1] not in SHAPES:
        raise ValueError(f"{text!r}: expected 'a [colour] shape' with a shape of {', '.join(SHAPES)}, "
                         f"got {' '.join(words)!r}")
    if len(words) == 3 and words[1] not in PALETTE:
        raise ValueError(f"{text!r}: unknown colour {words[1]!r} (colours {', '.join(COLOURS)})")
    return Group(words[-1], words[1] if len(words) == 3 else None)


def _split_joiner(words):
    """(left words, joiner, right words) at the first 'and' or relation of a prompt, or (words, None, [])."""
    for i, w in enumerate(words):
        if w in ("and", "above", "below"):
            return words[:i], w, words[i + 1:]
        if w in ("left", "right") and words[i + 1:i + 2] == ["of"]:
            return words[:i], f"{w} of", words[i + 2:]
    return words, None, []


def _category(groups, joiner, text):
    """The category of parsed groups joined by `joiner`; ValueError when they fit none."""
    if len(groups) == 1:
        g = groups[0]
        return "counting" if g.count > 1 else ("colours" if g.colour else "single")
    a, b = groups
    if a.count > 1 or b.count > 1:
        raise ValueError(f"{text!r}: counts appear only alone, as in 'three green triangles'")
    if a.shape == b.shape:
        raise ValueError(f"{text!r}: the two objects need different shapes")
    if joiner != "and":
        if not (a.colour and b.colour):
            raise ValueError(f"{text!r}: position prompts name two coloured objects, as in "
                             "'a red circle left of a blue square'")
        return "position"
    if (a.colour is None) != (b.colour is None):
        raise ValueError(f"{text!r}: either both objects have a colour or neither has")
    if a.colour and a.colour == b.colour:
        raise ValueError(f"{text!r}: the two objects of a colour-attribution prompt need different colours")
    return "colour_attribution" if a.colour else "two_objects"


@functools.lru_cache(maxsize=None)
def parse_prompt(text):
    """The Spec (immutable, so cached per text) of a prompt of the grammar (module docstring); ValueError
    naming the problem otherwise."""
    words = str(text).lower().replace(",", " ").split()
    left, joiner, right = _split_joiner(words)
    if joiner is not None and _split_joiner(right)[1] is not None:
        raise ValueError(f"{text!r}: at most two objects, joined by 'and' or one of {', '.join(RELATIONS)}")
    if joiner is not None and not right:
        raise ValueError(f"{text!r}: nothing after {joiner!r}")
    groups = tuple(_parse_phrase(p, text) for p in ([left, right] if joiner else [left]))
    category = _category(groups, joiner, text)
    return Spec(category, groups, joiner if category == "position" else None)


def all_specs():
    """{category: [Spec]}: every prompt of the grammar in a fixed order (two-object prompts both ways)."""
    S, C = SHAPES, COLOURS
    pairs = [(s1, s2) for s1 in S for s2 in S if s1 != s2]
    return {
        "single": [Spec("single", (Group(s),)) for s in S],
        "two_objects": [Spec("two_objects", (Group(s1), Group(s2))) for s1, s2 in pairs],
        "counting": [Spec("counting", (Group(s, c, n),)) for n in COUNTS for c in C for s in S],
        "colours": [Spec("colours", (Group(s, c),)) for c in C for s in S],
        "position": [Spec("position", (Group(s1, c1), Group(s2, c2)), r) for c1 in C for s1, s2 in pairs
                     for r in RELATIONS for c2 in C],
        "colour_attribution": [Spec("colour_attribution", (Group(s1, c1), Group(s2, c2))) for s1, s2 in pairs
                               for c1 in C for c2 in C if c1 != c2],
    }


def vocabulary():
    """Every word of the grammar, sorted (for a word-level text encoder); 'left of' is two words."""
    return sorted({word for specs in all_specs().values() for s in specs for word in prompt(s).split()})


MAX_WORDS = 10             # the longest prompt has 8 words ('a purple square left of a yellow triangle')


def tokenize(prompts, length=MAX_WORDS):
    """Prompts -> word ids (B, length) long, 1 + the word's index in vocabulary(), 0 padding: the input of the
    text encoders (the diffusion model's and the yes/no models'). A word outside the grammar: ValueError."""
    ids = {w: i + 1 for i, w in enumerate(vocabulary())}
    out = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, text in enumerate(prompts):
        words = text.lower().split()
        if len(words) > length or any(w not in ids for w in words):
            raise ValueError(f"{text!r} is not a prompt of the world's grammar "
                             f"(unknown word or over {length} words)")
        out[b, :len(words)] = torch.tensor([ids[w] for w in words], dtype=torch.long)
    return out


def composition(spec):
    """The order-free identity of a spec: equal for prompts that describe the same scenes ('a circle and a
    square' / 'a square and a circle'; 'A right of B' / 'B left of A', written with left of / above)."""
    if spec.category == "position":
        a, b = spec.groups
        if spec.relation in ("right of", "below"):
            return ("position", (b, a), OPPOSITE[spec.relation])
        return ("position", (a, b), spec.relation)
    return (spec.category, frozenset(spec.groups))


def is_heldout(spec):
    """Whether a spec's composition is held out of training (the rule in the module docstring)."""
    def i(g):
        return SHAPES.index(g.shape) + (COLOURS.index(g.colour) if g.colour else 0)
    if spec.category == "single":
        return False
    if spec.category == "position":
        _, (a, b), relation = composition(spec)
        return (i(a) + 2 * i(b) + (relation == "above")) % 5 == 0
    if spec.category == "counting":
        return (i(spec.groups[0]) + spec.groups[0].count) % 5 == 0
    return sum(i(g) for g in spec.groups) % 5 == 0


def split_prompts():
    """{category: {"train": [prompt], "heldout": [prompt]}}, fixed (no randomness; module docstring)."""
    return {cat: {"train": [prompt(s) for s in specs if not is_heldout(s)],
                  "heldout": [prompt(s) for s in specs if is_heldout(s)]}
            for cat, specs in all_specs().items()}


def read_prompt_file(path, grammar=True, words=True):
    """One prompt per line ('#' comments and blanks skipped); with `words` each must tokenize (the world's
    model reads it), with `grammar` also parse (the world's rewards read it); SD2 needs neither.
    FileNotFoundError for a missing file, ValueError naming the line (or an empty file) otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                if words or grammar:
                    tokenize([text])
                if grammar:
                    parse_prompt(text)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a prompt of the world's grammar ({e})") from None
            out.append(text)
    if not out:
        raise ValueError(f"{path} holds no prompt")
    return out


def draw_prompts(pools, n, rng):
    """n prompts of {name: [prompt]}: a pool uniformly among the non-empty ones, then a prompt of it
    uniformly (the training prompts drawn category-balanced)."""
    names = [c for c in pools if pools[c]]
    chosen = (names[i] for i in rng.integers(len(names), size=n))
    return [pools[c][rng.integers(len(pools[c]))] for c in chosen]


def eval_prompt_list(n, per_prompt, pool=None):
    """n evaluation prompts, `per_prompt` copies each (the seeds of a diversity figure): a fixed shuffle of
    each category's held-out prompts cycled to an equal share, or `pool` (a user's list) cycled."""
    rng = np.random.default_rng(1234)
    pools = [pool] if pool else [list(rng.permutation(v["heldout"])) for v in split_prompts().values()
                                 if v["heldout"]]
    per_pool = max(1, n // (per_prompt * len(pools)))
    return [str(p[i % len(p)]) for p in pools for i in range(per_pool) for _ in range(per_prompt)]


# -- scenes: sampling and hard negatives -------------------------------------------------------------------

def relation_of(dx, dy):
    """The relation 'A rel B' for the offset (dx, dy) of A's centre from B's (y down): the direction within
    45 degrees of it; None on a diagonal (|dx| == |dy|)."""
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _candidates(scene, size, rng, relation, n=100):
    """bool (n,) and (n, 2): n random box centres (base px, whole-pixel corners) for an object of `size`, and
    which of them keep GAP from every object of `scene` (and, with a relation and one object placed, put that
    object in the relation to this one with the RELATION_RATIO margin)."""
    d = SIZES[size]
    xy = rng.integers(BORDER, BASE - BORDER - d + 1, size=(n, 2)) + d / 2          # (n, 2)
    ok = np.ones(n, bool)
    for o in scene:
        reach = (d + SIZES[o.size]) / 2 + GAP
        ok &= (np.abs(xy - (o.x * BASE, o.y * BASE)) >= reach).any(1)
    if relation is not None and len(scene) == 1:
        offset = (scene[0].x * BASE, scene[0].y * BASE) - xy                      # (n, 2), A - B
        axis = 0 if relation in ("left of", "right of") else 1
        along = offset[:, axis] * (-1 if relation in ("left of", "above") else 1)
        ok &= (along > 0) & (along >= RELATION_RATIO * np.abs(offset[:, 1 - axis]))
    return ok, xy


def _place(objects, rng, relation=None):
    """A scene of [(shape, colour)] with random sizes and non-overlapping positions (rejection sampling);
    with a relation, the first object stands in it to the second. After 10 failed scenes every object is
    small (so crowded scenes lean small)."""
    for attempt in range(200):
        scene = []
        for shape, colour in objects:
            size = "small" if attempt >= 10 or rng.random() < 0.5 else "large"
            ok, xy = _candidates(scene, size, rng, relation)
            if not ok.any():
                break
            x, y = xy[ok.argmax()] / BASE
            scene.append(Obj(shape, colour, size, float(x), float(y)))
        if len(scene) == len(objects):
            return scene
    raise RuntimeError(f"could not place {len(objects)} objects")


def _objects(spec, rng):
    """[(shape, colour)] of the objects a spec names, a random colour for each of a colour-free group."""
    return [(g.shape, g.colour or COLOURS[rng.integers(len(COLOURS))])
            for g in spec.groups for _ in range(g.count)]


def sample_scene(spec, rng):
    """A random scene that satisfies `spec` (its objects and nothing else), to render at any resolution; rng
    a numpy Generator."""
    return _place(_objects(spec, rng), rng, spec.relation)


def _other(options, taken, rng):
    """A random element of `options` not in `taken`."""
    rest = [o for o in options if o not in taken]
    return rest[rng.integers(len(rest))]


def hard_negative(spec, rng, kind=None):
    """A scene that fails `spec` in one way, `kind` (default: one of NEGATIVES[category] at random):
    wrong_shape / wrong_colour (one object gets a shape / colour the prompt does not name), missing_object
    (one object dropped), extra_object (a random object added), wrong_count (n - 1 or n + 1 objects),
    swapped_colours (the two objects' colours exchanged), flipped_relation (the opposite relation)."""
    kinds = NEGATIVES[spec.category]
    kind = kind or kinds[rng.integers(len(kinds))]
    if kind not in kinds:
        raise ValueError(f"no {kind!r} negative for {spec.category} (kinds: {', '.join(kinds)})")
    objects, relation = _objects(spec, rng), spec.relation
    i = rng.integers(len(objects))                       # the object that goes wrong
    if kind == "wrong_shape":
        objects[i] = (_other(SHAPES, {g.shape for g in spec.groups}, rng), objects[i][1])
    elif kind == "wrong_colour":
        objects[i] = (objects[i][0], _other(COLOURS, {g.colour for g in spec.groups}, rng))
    elif kind == "missing_object":
        del objects[i]
    elif kind == "extra_object":
        objects.append((SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]))
    elif kind == "wrong_count":
        objects = objects[:1] * (len(objects) + (1 if rng.random() < 0.5 else -1))
    elif kind == "swapped_colours":
        objects = [(s, c) for (s, _), (_, c) in zip(objects, objects[::-1])]
    elif kind == "flipped_relation":
        relation = OPPOSITE[relation]
    return _place(objects, rng, relation if len(objects) == 2 else None)


# -- the checker -------------------------------------------------------------------------------------------

_BRIGHT = np.array([max(c) for c in PALETTE.values()], np.float32)                   # (6,)
_CHROMA = np.array(list(PALETTE.values()), np.float32) / _BRIGHT[:, None]              # (6, 3)
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Detection:
    """One object found in an image (shape / colour None: nothing fits): its box centre (x, y), its box bbox
    = (x0, y0, x1, y1) with x1 / y1 exclusive, and area, in pixels; score, its best template's soft IoU."""
    shape: str | None
    colour: str | None
    x: float
    y: float
    bbox: tuple
    area: int
    score: float


def _window(a, box, D):
    """The (D, D) crop of a 2-D array centred on box = (y0, x0, y1, x1), zeros beyond its edges (an odd slack
    rounded down), so that an object and a template line up by their boxes."""
    top, left = (box[0] + box[2] - D) // 2, (box[1] + box[3] - D) // 2
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + D, a.shape[0]), min(left + D, a.shape[1])
    out = np.zeros((D, D), np.float32)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = a[y0:y1, x0:x1]
    return out


@functools.lru_cache(maxsize=None)
def _template(shape, w, blur):
    """(coverage, box): `shape` rendered w px wide on a padded canvas, blurred (Gaussian, `blur` px), and the
    box of its pixels >= FG_LEVEL (what the detector would find); box None if there are none."""
    coverage = np.pad(shape_mask(shape, w), 4)                           # (w + 8, w + 8)
    if blur:
        coverage = ndimage.gaussian_filter(coverage, blur)
    coverage[coverage < SOFT_FLOOR] = 0                                  # as the detector does
    ys, xs = np.nonzero(coverage >= FG_LEVEL)
    return coverage, ((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) if len(ys) else None)


@functools.lru_cache(maxsize=None)
def _templates(d):
    """(float32 (n, d + 6, d + 6), int (n,)): the coverage windows of every template (each shape at widths 3
    to d + 3 px and BLURS) whose box is d - 1 to d + 1 px wide, and the index of each one's shape in SHAPES;
    n may be 0."""
    D, wins, which = d + 6, [np.zeros((0, d + 6, d + 6), np.float32)], []
    for k, shape in enumerate(SHAPES):
        for w in range(3, d + 4):
            for blur in BLURS:
                coverage, box = _template(shape, w, blur)
                if box is not None and abs(max(box[2] - box[0], box[3] - box[1]) - d) <= 1:
                    wins.append(_window(coverage, box, D)[None])
                    which.append(k)
    return np.concatenate(wins), np.array(which, int)


def classify_shape(coverage, box):
    """(shape or None, score): the shape of the template whose coverage best matches an object's, by soft IoU
    (sum of minima / sum of maxima) of the two lined up by their boxes. coverage (H, W) in [0, 1] is the
    object's alone (zero elsewhere), box = (y0, x0, y1, x1) that of its pixels >= FG_LEVEL."""
    h, w = box[2] - box[0], box[3] - box[1]
    templates, which = _templates(max(h, w))                             # (n, D, D), (n,)
    m = _window(coverage, box, templates.shape[-1])                      # (D, D)
    iou = np.minimum(templates, m).sum((1, 2)) / np.maximum(templates, m).sum((1, 2))    # (n,)
    if not len(iou):
        return None, 0.0
    best = int(iou.argmax())
    fits = iou[best] >= SHAPE_MIN_IOU and max(h, w) <= MAX_ASPECT * min(h, w)
    return (SHAPES[which[best]] if fits else None), float(iou[best])


def detect(image):
    """[Detection] of the objects in one uint8 (H, W, 3) image, by colour segmentation (module docstring)."""
    img = np.asarray(image, np.float32)                                  # (H, W, 3)
    value = img.max(-1)                                                  # (H, W), brightest channel
    local = ndimage.uniform_filter(img, size=(3, 3, 1))                  # (H, W, 3), 3 x 3 mean: less noise
    chroma = local / np.maximum(local.max(-1), 1)[..., None]             # (H, W, 3), shading divided out
    sq = (chroma ** 2).sum(-1, keepdims=True) - 2 * chroma @ _CHROMA.T + (_CHROMA ** 2).sum(-1)  # |c - p|^2
    dist = np.sqrt(np.maximum(sq, 0))                                    # (H, W, 6), chroma distances
    nearest = dist.argmin(-1)                                            # (H, W)
    foreground = value >= FG_LEVEL * _BRIGHT[nearest]                    # (H, W)
    min_area = MIN_AREA * img.shape[0] * img.shape[1] / BASE ** 2
    found = []
    for k in np.unique(nearest[foreground]):                             # the colours present
        labels, n = ndimage.label(foreground & (nearest == k), structure=_EIGHT)   # (H, W)
        areas = np.bincount(labels.ravel(), minlength=n + 1)             # (n + 1,)
        tones = ndimage.mean(dist[..., k], labels, np.arange(1, n + 1))  # (n,) mean chroma distances
        for j, (sy, sx) in enumerate(ndimage.find_objects(labels)):
            if areas[j + 1] < min_area:
                continue
            m = 4 + abs((sy.stop - sy.start) - (sx.stop - sx.start))      # margin for the template window
            near = np.s_[max(sy.start - m, 0):sy.stop + m, max(sx.start - m, 0):sx.stop + m]
            others = foreground[near] & (labels[near] != j + 1)          # pixels of other objects, zeroed
            coverage = np.clip(value[near] / _BRIGHT[k], 0, 1) * ~others  # (h + 2m, w + 2m) at most
            coverage[coverage < SOFT_FLOOR] = 0
            top, left = near[0].start, near[1].start
            shape, score = classify_shape(coverage, (sy.start - top, sx.start - left, sy.stop - top,
                                                     sx.stop - left))
            found.append(Detection(shape, COLOURS[k] if tones[j] <= COLOUR_TOL else None,
                                   (sx.start + sx.stop) / 2, (sy.start + sy.stop) / 2,
                                   (sx.start, sy.start, sx.stop, sy.stop), int(areas[j + 1]), score))
    return found


def satisfies(detections, spec):
    """Whether detected objects are exactly what `spec` asks for: each group's shape found `count` times, all
    in its colour (if it names one), nothing else, and the relation between the two objects' centres."""
    if len(detections) != sum(g.count for g in spec.groups):
        return False
    found = []
    for g in spec.groups:      # the groups of a spec have different shapes, so shapes tell them apart
        mine = [d for d in detections if d.shape == g.shape]
        if len(mine) != g.count or any(g.colour and d.colour != g.colour for d in mine):
            return False
        found.append(mine[0])
    if spec.relation is not None:
        a, b = found
        return relation_of(a.x - b.x, a.y - b.y) == spec.relation
    return True


def check(image, spec):
    """Whether one uint8 (H, W, 3) image shows exactly what `spec` (a Spec or a prompt) asks for."""
    return satisfies(detect(image), spec if isinstance(spec, Spec) else parse_prompt(spec))


def check_batch(images, specs):
    """bool (B,): `check` of each image; images uint8 (B, H, W, 3) or a tensor (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    return np.array([check(im, s) for im, s in zip(images, specs)], bool)


def diversity(images, prompts):
    """Per prompt with two images or more, the mean pairwise RMS distance (per pixel, in [-1, 1] units)
    between its images (B, 3, H, W) from different seeds: a model collapsing onto one image per prompt shows
    as a drop."""
    by = {}
    for i, p in enumerate(prompts):
        by.setdefault(p, []).append(i)
    return [float(torch.pdist(images[idx].flatten(1)).mean()) / np.sqrt(images[0].numel())
            for idx in by.values() if len(idx) > 1]


def metrics(images, prompts, reward, judge=None):
    """The evaluation's figures side by side, overall and per category: the checker (GenEval's analogue, 0/1:
    Wilson intervals), the `reward` and `judge` scores (B,) given, and the per-prompt diversity."""
    specs = [parse_prompt(p) for p in prompts]
    ok, cats = check_batch(images, specs), np.array([s.category for s in specs])
    per = lambda m: {"checker": common.mean_ci95(ok[m]), "reward": common.mean_ci95(reward[m]),
                     "judge": common.mean_ci95(judge[m]) if judge is not None else None, "n": int(m.sum())}
    return per(np.ones(len(ok), bool)) | {
        "diversity": common.mean_ci95(diversity(images, prompts)),
        "per_category": {c: per(cats == c) for c in CATEGORIES if (cats == c).any()}}


# -- a look at the world -----------------------------------------------------------------------------------

def _wrap(draw, text, font, width):
    """`text` broken into lines no wider than `width` pixels."""
    lines = [""]
    for w in text.split():
        line = f"{lines[-1]} {w}".strip()
        if draw.textlength(line, font=font) <= width or not lines[-1]:
            lines[-1] = line
        else:
            lines.append(w)
    return lines


def save_examples(path, size=32, scale=4, per_row=6, seed=0):
    """A PNG grid of random scenes with their prompts under them, upscaled `scale` x (nearest), one row per
    category (training and held-out prompts alike)."""
    rng = np.random.default_rng(seed)
    cell, label_w, text_h = size * scale, 120, 48
    font = ImageFont.load_default(11)
    width, height = label_w + per_row * (cell + 8), len(CATEGORIES) * (cell + text_h + 8)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (cat, specs) in enumerate(all_specs().items()):
        top = r * (cell + text_h + 8) + 4
        draw.text((4, top + cell // 2), cat, fill="black", font=font)
        for c in range(per_row):
            spec = specs[rng.integers(len(specs))]
            left = label_w + c * (cell + 8)
            image = Image.fromarray(render(sample_scene(spec, rng), size))
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (left, top))
            for k, line in enumerate(_wrap(draw, prompt(spec), font, cell)):
                draw.text((left, top + cell + 2 + 12 * k), line, fill="black", font=font)
    sheet.save(path)
    return path


def in_grammar(prompt):
    """Whether `prompt` is a sentence of the world's grammar (the world's checker and rewards read only those)."""
    try:
        return bool(parse_prompt(prompt))
    except ValueError:
        return False


def to_world(images):
    """Images larger than the world's (SD2's 512 px) area-pooled to its 32 px, for the world's checker and
    rewards."""
    return images if images.shape[-1] <= 64 else torch.nn.functional.interpolate(images, size=32, mode="area")


def category_of(prompt):
    """The prompt's category in the world's grammar, or 'prompt' for any other text (an SD2 prompt)."""
    try:
        return parse_prompt(prompt).category
    except ValueError:
        return "prompt"


def save_grid(path, ref_images, ft_images, prompts, per_cat=2, seeds=4, scale=4):
    """For per_cat held-out prompts of each category: `seeds` reference images, then the fine-tuned model's
    from the same seeds, captioned with the prompt; upscaled x4 (nearest)."""
    rows, seen = [], {}
    for i, p in enumerate(prompts):
        c = category_of(p)
        fresh = p not in [prompts[j] for j in rows] and prompts[i:i + seeds] == [p] * seeds
        if fresh and seen.get(c, 0) < per_cat:
            rows.append(i), seen.__setitem__(c, seen.get(c, 0) + 1)
    cell, font = ref_images.shape[1] * scale, ImageFont.load_default(12)
    cols = seeds * (cell + 4) + 16
    sets = [("reference", ref_images)] + ([("fine-tuned, same seeds", ft_images)] if ft_images is not None
                                           else [])
    sheet = Image.new("RGB", (len(sets) * cols, len(rows) * (cell + 18) + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, ims) in enumerate(sets):
        draw.text((k * cols + 4, 2), name, fill="black", font=font)
        for r, i in enumerate(rows):                                   # a caption line, then the images
            draw.text((4, 18 + r * (cell + 18)), prompts[i], fill="black", font=font) if k == 0 else None
            for j in range(seeds):
                im = Image.fromarray(ims[i + j]).resize((cell, cell), Image.NEAREST)
                sheet.paste(im, (k * cols + j * (cell + 4), 32 + r * (cell + 18)))
    sheet.save(path)
