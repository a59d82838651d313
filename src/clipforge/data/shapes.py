"""``shapes://`` — a built-in image–caption data set, generated on the fly.

Each image (default 64×64 RGB) shows one to three objects on a textured background; each
caption describes them in varied English ("a small red star in the top left", "there is a
blue circle to the right of a yellow square"); a `COLOURLESS` fraction of objects is named
by its shape alone ("a star in the top left").  Objects are one of 8 shapes × 8 colours ×
2 sizes.  Everything is a pure function of ``(seed, split, index)``: no files, the same
sample every time, on every machine.

Held-out pairs.  Sixteen colour–shape pairs never appear in any training image (nor in any
training caption): for colour number i (in ``COLOURS`` order) the shapes number i and
(i + 3) mod 8 (in ``SHAPES`` order) are held out — every colour loses two shapes and every
shape two colours, so each attribute is still seen often on its own.  The ``heldout``
split shows single objects of exactly these pairs, ``seen`` single objects of the other 48
pairs: zero-shot accuracy on ``heldout`` measures whether a model composes a colour and a
shape it only learned apart.

URI form: ``shapes://?split=train&size=64&seed=0&n=100000`` (all optional; ``split`` is
``train``, ``val`` (the training distribution, other samples), ``seen`` or ``heldout``; ``n``
the number of samples, default 100,000 for train and 1,024 for the others).

Evaluation: every split is a `CaptionedSource` (retrieval: ``shapes://?split=val``); the
``seen`` and ``heldout`` splits are also a `LabelledSource` (zero-shot classification over
`class_names`, with the prompts in `ShapesDataset.templates`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor

from clipforge.data._errors import DataError
from clipforge.data.images import ImageLoader
from clipforge.data.protocols import CaptionIndex, first_n

__all__ = [
    "COLOURLESS",
    "SHAPES",
    "COLOURS",
    "HELDOUT_PAIRS",
    "ShapesDataset",
    "open_shapes",
    "class_names",
]

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
RGB = {
    "red": (220, 30, 30),
    "green": (40, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (30, 220, 230),
}
HELDOUT_PAIRS = frozenset(
    (COLOURS[i], SHAPES[j]) for i in range(8) for j in (i, (i + 3) % 8)
)
SEEN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
SPLITS = ("train", "val", "seen", "heldout")

# Positions on a 3×3 grid, named as captions name them.
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")
_SUPERSAMPLE = 2  # draw at 2× and downsample: anti-aliased edges


def class_names() -> list[str]:
    """The 64 zero-shot classes, "colour shape", colour-major (index = 8·colour + shape)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    big: bool
    row: int  # 0..2
    col: int  # 0..2


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of radius r at (cx, cy); None for the circle."""
    def ring(k: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        angles = [phase + 2 * math.pi * t / k for t in range(k)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]

    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, r * 1.1, -math.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r * 1.1), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r * 0.95, r * 0.33
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    if shape == "heart":
        pts = []
        for t in range(48):
            u = 2 * math.pi * t / 48
            x = 16 * math.sin(u) ** 3
            y = 13 * math.cos(u) - 5 * math.cos(2 * u) - 2 * math.cos(3 * u) - math.cos(4 * u)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        return pts
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "diamond":
        return [(cx, cy - r * 1.15), (cx + r * 0.75, cy), (cx, cy + r * 1.15), (cx - r * 0.75, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: random.Random, size: int) -> Image.Image:
    """A muted texture: a dark-to-grey gradient, stripes or noise, never a saturated colour."""
    base = [rng.randint(40, 110) for _ in range(3)]
    kind = rng.choice(("gradient", "stripes", "noise", "checks"))
    img = Image.new("RGB", (size, size), tuple(base))
    draw = ImageDraw.Draw(img)
    if kind == "gradient":
        other = [rng.randint(20, 120) for _ in range(3)]
        for y in range(size):
            t = y / max(1, size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif kind == "stripes":
        step = rng.randint(4, 10)
        shade = tuple(min(255, c + rng.randint(10, 30)) for c in base)
        for k in range(-size, 2 * size, step):
            draw.line([(k, 0), (k + size, size)], fill=shade, width=max(1, step // 3))
    elif kind == "checks":
        step = rng.randint(6, 16)
        shade = tuple(max(0, c - rng.randint(10, 30)) for c in base)
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)
    else:  # grey noise from our own generator (PIL's effect_noise draws from C's rand())
        noise = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.randint(10, 30), (size, size))
        img = Image.blend(img, Image.fromarray(noise.clip(0, 255).astype(np.uint8), "L").convert("RGB"), 0.25)
    return img


def _draw(objs: list[Obj], rng: random.Random, size: int) -> Image.Image:
    big = size * _SUPERSAMPLE
    canvas = _background(rng, size).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    for o in objs:
        r = cell * (0.42 if o.big else 0.26)
        jitter = cell * 0.5 - r * 1.15
        cx = cell * (o.col + 0.5) + rng.uniform(-jitter, jitter)
        cy = cell * (o.row + 0.5) + rng.uniform(-jitter, jitter)
        shade = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in RGB[o.colour])
        pts = _polygon(o.shape, cx, cy, r)
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
        else:
            draw.polygon(pts, fill=shade)
    small = canvas.resize((size, size), Image.LANCZOS)
    return small.filter(ImageFilter.SMOOTH) if size < 48 else small


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

_SIZE_WORDS = {True: ("big", "large"), False: ("small", "little", "tiny")}
_SHAPE_SYNONYMS = {
    "square": ("square", "box"), "circle": ("circle", "disc", "round dot"), "diamond": ("diamond", "rhombus"),
}


# The fraction of objects a training caption names by shape alone ("a star in the top left"):
# such captions are matched only by an image's shapes, whatever their colours, which teaches
# the image tower shape features that do not lean on colour — what recognising a colour–shape
# pair never seen together needs.
COLOURLESS = 0.3


def _noun(o: Obj, rng: random.Random, *, with_size: bool) -> str:
    shape = rng.choice(_SHAPE_SYNONYMS.get(o.shape, (o.shape,)))
    words = [o.colour, shape] if rng.random() >= COLOURLESS else [shape]
    if with_size:
        words.insert(0, rng.choice(_SIZE_WORDS[o.big]))
    return " ".join(words)


def _where(o: Obj) -> str:
    if (o.row, o.col) == (1, 1):
        return "in the center"
    if o.row == 1:
        return f"on the {_COLS[o.col]}"
    if o.col == 1:
        return f"at the {_ROWS[o.row]}"
    return f"in the {_ROWS[o.row]} {_COLS[o.col]}"


def _relation(a: Obj, b: Obj, rng: random.Random) -> str:
    """How a stands relative to b, in words."""
    options = []
    if a.col < b.col:
        options.append("to the left of")
    if a.col > b.col:
        options.append("to the right of")
    if a.row < b.row:
        options.append("above")
    if a.row > b.row:
        options.append("below")
    return rng.choice(options) if options else "next to"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(objs: list[Obj], rng: random.Random) -> str:
    with_size = rng.random() < 0.5
    nouns = [_noun(o, rng, with_size=with_size) for o in objs]
    if len(objs) == 1:
        n = _article(nouns[0])
        return rng.choice((
            f"{n} {_where(objs[0])}", n, f"a picture of {n}", f"there is {n} {_where(objs[0])}",
            f"{n} on a patterned background", f"an image showing {n}",
        ))
    if len(objs) == 2 and rng.random() < 0.6:
        a, b = _article(nouns[0]), _article(nouns[1])
        rel = _relation(objs[0], objs[1], rng)
        return rng.choice((f"{a} {rel} {b}", f"there is {a} {rel} {b}", f"{a} is {rel} {b}"))
    listed = [_article(n) for n in nouns]
    body = ", ".join(listed[:-1]) + " and " + listed[-1]
    return rng.choice((body, f"{body} on a textured background", f"a picture with {body}"))


# --------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------


class ShapesDataset:
    """Deterministic synthetic image–caption pairs; ``ds[k] -> (PIL.Image, caption)``.

    ``split="train"``: one to three objects per image, never a held-out pair.
    ``split="seen"`` / ``"heldout"``: one object per image, cycling through the 48 seen
    (16 held-out) pairs so classes are balanced; ``ds.label(k)`` is the class index in
    :func:`class_names`.
    """

    def __init__(self, *, split: str = "train", size: int = 64, seed: int = 0, n: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
        if size < 16:
            raise ValueError(f"shapes image size must be at least 16 pixels, got {size}")
        self.split, self.size, self.seed = split, size, seed
        self.n = n if n is not None else (100_000 if split == "train" else 1_024)
        if self.n < 1:
            raise ValueError(f"shapes n must be positive, got {self.n}")

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.split}/{index}")

    def objects(self, index: int) -> list[Obj]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        rng = self._rng(index)
        if self.split in ("seen", "heldout"):
            pairs = SEEN_PAIRS if self.split == "seen" else sorted(HELDOUT_PAIRS)
            colour, shape = pairs[index % len(pairs)]
            return [Obj(shape, colour, rng.random() < 0.5, rng.randrange(3), rng.randrange(3))]
        count = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
        cells = rng.sample(range(9), count)
        objs = []
        for cell in cells:
            colour, shape = rng.choice(SEEN_PAIRS)
            objs.append(Obj(shape, colour, rng.random() < 0.5, cell // 3, cell % 3))
        return objs

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        objs = self.objects(index)
        return self._image(index, objs), self.caption(index, objs)

    def _image(self, index: int, objs: list[Obj]) -> Image.Image:
        rng = self._rng(index)
        rng.random()  # decouple drawing from the object draw in `objects`
        return _draw(objs, rng, self.size)

    def image(self, index: int) -> Image.Image:
        """The image of sample ``index``, without its caption."""
        return self._image(index, self.objects(index))

    def caption(self, index: int, objs: list[Obj] | None = None) -> str:
        """The caption of sample ``index``, without drawing its image."""
        objs = self.objects(index) if objs is None else objs
        return caption(objs, random.Random(f"caption/{self.seed}/{self.split}/{index}"))

    @property
    def classnames(self) -> list[str]:
        """Zero-shot classes of the test splits (see :func:`class_names`)."""
        return class_names()

    # Prompts in the captions' own styles, for zero-shot classification ("{c}" is the class).
    templates = ("a {c}", "a picture of a {c}", "there is a {c}", "an image showing a {c}")

    def label(self, index: int) -> int:
        """Class index (8·colour + shape) of a single-object test image."""
        if self.split not in ("seen", "heldout"):
            raise DataError(f"shapes://?split={self.split} has no class labels: they exist for the "
                            "'seen' and 'heldout' splits only (one object per image)")
        o = self.objects(index)[0]
        return 8 * COLOURS.index(o.colour) + SHAPES.index(o.shape)

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, drawn as ``ds[k]`` draws them."""
        return ImageLoader(range(first_n(self.n, limit)), transform, batch_size=batch_size, num_workers=num_workers,
                           source=f"shapes://?split={self.split}", read=self.image, read_errors=())

    def caption_index(self, limit: int | None = None) -> CaptionIndex:
        """The caption of each of the first ``limit`` images (all when None): one per image."""
        n = first_n(self.n, limit)
        return CaptionIndex([self.caption(k) for k in range(n)], list(range(n)))

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for k in range(self.n):
            yield self[k]


def open_shapes(location: str = "", *, split: str = "train", size: str | int = 64, seed: str | int = 0,
                n: str | int | None = None) -> ShapesDataset:
    """Opener of ``shapes://?split=…&size=…&seed=…&n=…`` URIs (see `clipforge.data.open_data`)."""
    if location.strip("/"):
        raise ValueError(f"shapes:// takes no location, only options (got {location!r})")
    try:
        return ShapesDataset(split=split, size=int(size), seed=int(seed), n=None if n is None else int(n))
    except ValueError as e:
        raise ValueError(f"shapes://: {e}") from None
