"""The toy world's vocabulary: what can appear in a scene, what it is called, and what is held out.

A scene is a background and one to three objects. An object is

    shape    circle, square, triangle, star, heart, cross, diamond, ring
    color    one of ten saturated colours (the object's body)
    size     small or large
    pattern  plain, striped, dotted or checkered, drawn in a second colour inside a rim of the body colour

Everything here is data: palettes, words, the class hierarchy used to rename an object ("star" ->
"symbol" -> "shape" -> "object"), the held-out split, and the personal concepts. The geometry that
turns this into pixels lives in `scenes.py`; the words that turn it into captions in `captions.py`.

The palettes are chosen for the judge: every object colour is at least 90 RGB units (Euclidean, 0-255
scale) from every other object colour and from every background, so colours stay apart after blur,
noise and a colour shift of a few tens of units. One pair of colours is not apart as a mixture: brown
lies about 17 units from the even blend of orange and black, so where a pattern's thin stripes blend
two colours at their edges, the judge may read brown as orange on black or the reverse. In 60 clean
64-px renders of each pairing: an orange body with a brown pattern 2 pattern colours misread, black with
brown 4, brown with orange 4 bodies and 4 patterns, red with blue and green with pink none; in 400 scenes
of the "halves" layout (seeds 5000-5399, 629 objects) 4 pattern colours misread, 3 of them brown. Moving
brown would change the world the shipped toy models were trained on, so the palette stays.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]

BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 240),
    "gray": (128, 128, 128),
    "sky": (160, 200, 235),
    "grass": (135, 165, 65),
    "sand": (225, 200, 150),
    "night": (15, 25, 110),
}

COLORS: dict[str, RGB] = {
    "red": (215, 35, 40),
    "orange": (245, 130, 20),
    "yellow": (245, 225, 50),
    "green": (30, 185, 80),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 215),
    "purple": (135, 45, 185),
    "pink": (240, 110, 190),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")

# Size of an object = the longer side of its unrotated bounding box, in pixels of the 64x64 canvas,
# drawn uniformly from the range. The gap between the classes keeps "small" and "large" unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (15.0, 17.0), "large": (26.0, 28.0)}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

# Pattern geometry in canvas pixels, in the object's own (rotated) frame, anchored at its centre so
# that even a small object shows several elements: two stripes flank the centre, a dot sits on it,
# four checks meet at it.
STRIPE_PERIOD, STRIPE_WIDTH = 7.0, 3.0  # horizontal stripes of the second colour, 3 px every 7 px
DOT_PERIOD, DOT_RADIUS = 6.0, 1.75  # a square lattice of dots
CHECK_CELL = 4.0  # checkerboard cells
PATTERN_RIM = 1.0  # the pattern stays this far inside the outline, so the body colour frames it

ROTATION_RANGE = 10.0  # objects are turned by up to +-10 degrees ("pose")

# Names and synonyms. The first word of each tuple is the canonical name.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "ring": ("ring", "donut"),
}
PLURALS: dict[str, str] = {
    "circle": "circles", "disc": "discs", "square": "squares", "box": "boxes", "triangle": "triangles",
    "star": "stars", "heart": "hearts", "cross": "crosses", "plus sign": "plus signs",
    "diamond": "diamonds", "rhombus": "rhombuses", "ring": "rings", "donut": "donuts",
}  # fmt: skip
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PATTERN_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered",),
}
PATTERN_NOUNS: dict[str, tuple[str, ...]] = {
    "striped": ("stripes",),
    "dotted": ("dots", "spots"),
    "checkered": ("checks",),
}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of")
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "white": ("on a white background", "on white"),
    "gray": ("on a gray background", "on gray", "on a grey background"),
    "sky": ("on a sky background", "against the sky"),
    "grass": ("on a grass background", "on grass", "on a lawn"),
    "sand": ("on a sand background", "on sand", "on the beach"),
    "night": ("on a night background", "at night", "against the night sky"),
}

# Class hierarchy for renaming an object in a caption (concept-name substitution), most specific first.
SHAPE_GROUPS: dict[str, str] = {
    "circle": "round shape", "ring": "round shape",
    "square": "polygon", "triangle": "polygon", "diamond": "polygon",
    "star": "symbol", "heart": "symbol", "cross": "symbol",
}  # fmt: skip


def class_path(shape: str) -> tuple[str, ...]:
    """The names of ``shape`` from specific to general, e.g. star -> ("star", "symbol", "shape", "object")."""
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")
    return (shape, SHAPE_GROUPS[shape], "shape", "object")


# Spatial relations: "A <phrase> B" means A's centre lies on that side of B's centre.
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}

# ---- The held-out split -------------------------------------------------------------------------
# Eight color x shape pairs never appear in training scenes: one per shape, each with a different
# colour, so every colour and every shape is still seen in training with other partners.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "circle"),
        ("orange", "square"),
        ("cyan", "triangle"),
        ("red", "star"),
        ("blue", "heart"),
        ("yellow", "cross"),
        ("pink", "diamond"),
        ("green", "ring"),
    }
)
# One phrasing per relation never appears in training captions.
HELDOUT_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left side of",),
    "right": ("on the right side of",),
    "above": ("higher than",),
    "below": ("beneath",),
}


# ---- Personal concepts --------------------------------------------------------------------------
@dataclass(frozen=True)
class PersonalConcept:
    """A "my object" subject: a fixed look (shape, body colour, pattern in a second colour).

    The base scene sampler never draws its (color, pattern, pattern_color) combination on any shape,
    so the look is new to a model trained on base data, like a DreamBench subject.
    """

    name: str
    shape: str
    color: str
    pattern: str
    pattern_color: str

    @property
    def description(self) -> str:
        """Identifier-free description, e.g. "a pink heart with green checks"."""
        return describe(self.shape, self.color, self.pattern, self.pattern_color)

    @property
    def class_path(self) -> tuple[str, ...]:
        return class_path(self.shape)


def describe(shape: str, color: str, pattern: str = "plain", pattern_color: str | None = None) -> str:
    """Canonical short description of a look: "a red star", "a yellow star with purple dots"."""
    text = f"a {color} {shape}"
    if pattern != "plain":
        text += f" with {pattern_color} {PATTERN_NOUNS[pattern][0]}"
    return text


CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("my_heart", "heart", "pink", "checkered", "green"),
    PersonalConcept("my_star", "star", "yellow", "dotted", "purple"),
    PersonalConcept("my_circle", "circle", "blue", "striped", "orange"),
    PersonalConcept("my_square", "square", "green", "dotted", "red"),
    PersonalConcept("my_triangle", "triangle", "orange", "checkered", "blue"),
    PersonalConcept("my_cross", "cross", "purple", "striped", "yellow"),
    PersonalConcept("my_diamond", "diamond", "cyan", "checkered", "brown"),
    PersonalConcept("my_ring", "ring", "red", "striped", "cyan"),
    PersonalConcept("my_heart_2", "heart", "black", "dotted", "yellow"),
    PersonalConcept("my_square_2", "square", "brown", "striped", "pink"),
)
CONCEPT_LOOKS: frozenset[tuple[str, str, str]] = frozenset((c.color, c.pattern, c.pattern_color) for c in CONCEPTS)


def concept(name: str) -> PersonalConcept:
    """The personal concept called ``name`` (see `CONCEPTS`)."""
    for candidate in CONCEPTS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"Unknown personal concept {name!r}; choose one of {[c.name for c in CONCEPTS]}.")


def is_base_look(color: str, shape: str, pattern: str, pattern_color: str | None, split: str) -> bool:
    """Whether the base sampler of ``split`` may draw this object look.

    Concept looks are never allowed; held-out color x shape pairs only in the "heldout" split.
    """
    if (color, pattern, pattern_color) in CONCEPT_LOOKS:
        return False
    return split == "heldout" or (color, shape) not in HELDOUT_PAIRS
