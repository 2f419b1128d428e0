"""Captions of toy scenes, with every word tied to the objects it names.

    scene, caption = sample_captioned(seed=3)
    caption.text               "a small orange striped circle on a sand background"
    caption.object_words(0)    [Word("a", 0, 1, role="article", mention=0), Word("small", 2, 7, role="size", mention=0), ...]

A caption is built from `Piece`s: short runs of text, each tagged with the mention it belongs to
(or none, for glue such as "to the left of") and its role ("size", "color", "shape", ...). The
text and the character span of every word follow from the pieces, so renaming an object (concept
substitution: "a red star" -> "a <sks> star") keeps every span exact.

Variety, all drawn from the seed: attribute order and optional size, adjective or "with ..." pattern
phrases, synonyms ("box", "disc", "plus sign"), counts for repeated looks ("two red circles"),
spatial relations that hold in the image, an optional prefix ("a picture of") and background phrase.

Personal concepts: `with_concept` renames a mention to an identifier and a class word ("a sks star");
`recontext_prompts` are the fixed DreamBench-style prompts of a concept, named that way or by the
class word alone ("a star", `without_identifier`), as an image-prompt adapter is prompted.

Conventions the metrics rely on: colour and shape are always stated; a pattern that is not
mentioned is plain; size and the pattern's colour are stated only sometimes (`Mention.attributes`
lists what was stated). Captions of "heldout" scenes use the held-out relation phrasings, captions
of "train" scenes never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import scenes, world


@dataclass(frozen=True)
class Piece:
    """A run of caption text. ``mention`` indexes `Caption.mentions`; None for words of no object.

    Roles: article, count, size, color, pattern, pattern_color, shape and concept (words of a
    mention); prefix, relation, background and glue (the rest).
    """

    text: str
    role: str = "glue"
    mention: int | None = None


@dataclass(frozen=True)
class Word:
    """One word of the caption and its character span: ``caption.text[start:end] == text``."""

    text: str
    start: int
    end: int
    role: str
    mention: int | None


@dataclass(frozen=True)
class Mention:
    """A noun phrase naming one or more scene objects (several when it counts: "two red circles").

    ``attributes`` holds what the words state: shape, color and pattern always, size and
    pattern_color when said. A renamed mention (`with_concept`) states at most its shape and
    records the ``concept`` identifier.
    """

    objects: tuple[int, ...]
    attributes: dict[str, str] = field(default_factory=dict)
    concept: str | None = None


@dataclass(frozen=True)
class Caption:
    """A caption: its pieces (the text), what each mention names and states, and the relations it claims."""

    pieces: tuple[Piece, ...]
    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...] = ()  # (mention a, "left"/"right"/"above"/"below", mention b)

    @property
    def text(self) -> str:
        return "".join(_joined(self.pieces)[0])

    def words(self) -> list[Word]:
        """Every word with its character span and role."""
        _, starts = _joined(self.pieces)
        found = []
        for piece, start in zip(self.pieces, starts):
            offset = 0
            for token in piece.text.split(" "):
                if token:
                    found.append(Word(token, start + offset, start + offset + len(token), piece.role, piece.mention))
                offset += len(token) + 1
        return found

    def mention_words(self, mention: int) -> list[Word]:
        """The words of one mention, in order."""
        if not 0 <= mention < len(self.mentions):
            raise ValueError(f"Mention {mention} does not exist; this caption has {len(self.mentions)} mentions.")
        return [w for w in self.words() if w.mention == mention]

    def object_words(self, index: int) -> list[Word]:
        """The words that name scene object ``index`` (shared by all objects of a counted mention)."""
        for m, mention in enumerate(self.mentions):
            if index in mention.objects:
                return self.mention_words(m)
        raise ValueError(f"Scene object {index} is not named by caption {self.text!r}.")


def _joined(pieces: tuple[Piece, ...]) -> tuple[list[str], list[int]]:
    """Text chunks (pieces with their separating spaces) and each piece's start offset."""
    chunks, starts, position = [], [], 0
    for i, piece in enumerate(pieces):
        separator = "" if i == 0 or piece.text.startswith(",") else " "
        chunks.append(separator + piece.text)
        starts.append(position + len(separator))
        position += len(separator) + len(piece.text)
    return chunks, starts


# ---- Building captions ----------------------------------------------------------------------------
def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


# How often each optional phrasing is used.
SAY_SIZE = 0.75  # "a large red star" rather than "a red star"
SAY_PLAIN = 0.2  # "a plain red star"
PATTERN_AS_ADJECTIVE = 0.5  # "a red striped star" rather than "a red star with blue stripes"
CANONICAL_NOUN = 0.7  # otherwise any of the shape's words, synonyms included
SAY_PREFIX = 0.25  # "a picture of ..."
SAY_RELATION = 0.8  # between the first two mentions, when one holds; otherwise "and"
SAY_BACKGROUND = 0.85


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _mention_pieces(
    rng: np.random.Generator, obj: scenes.ObjectSpec, count: int, m: int, shape_only: float = 0.0
) -> tuple[list[Piece], dict]:
    """Pieces of one noun phrase for ``count`` objects with ``obj``'s look, and the attributes it states;
    with probability ``shape_only`` the shape word alone ("a heart", "two stars"), its look left open."""
    if shape_only and rng.random() < shape_only:  # no draw at all when 0: captions stay as they were
        noun = world.SHAPE_WORDS[obj.shape][0] if count == 1 else world.PLURALS[world.SHAPE_WORDS[obj.shape][0]]
        lead = Piece(_article(noun), "article", m) if count == 1 else Piece(world.COUNT_WORDS[count], "count", m)
        return [lead, Piece(noun, "shape", m)], {"shape": obj.shape}
    stated = {"shape": obj.shape, "color": obj.color, "pattern": obj.pattern}
    before: list[Piece] = []  # words between the article/count and the noun
    if rng.random() < SAY_SIZE:
        before.append(Piece(_choice(rng, world.SIZE_WORDS[obj.size]), "size", m))
        stated["size"] = obj.size
    before.append(Piece(obj.color, "color", m))
    after: list[Piece] = []
    if obj.pattern == "plain":
        if rng.random() < SAY_PLAIN:
            before.insert(len(before) - 1, Piece(_choice(rng, world.PATTERN_ADJECTIVES["plain"]), "pattern", m))
    elif rng.random() < PATTERN_AS_ADJECTIVE:
        before.append(Piece(_choice(rng, world.PATTERN_ADJECTIVES[obj.pattern]), "pattern", m))
    else:
        noun = _choice(rng, world.PATTERN_NOUNS[obj.pattern])
        after = [Piece("with", "pattern", m), Piece(obj.pattern_color, "pattern_color", m), Piece(noun, "pattern", m)]
        stated["pattern_color"] = obj.pattern_color
    words = world.SHAPE_WORDS[obj.shape]
    noun = words[0] if rng.random() < CANONICAL_NOUN else _choice(rng, words)
    noun = noun if count == 1 else world.PLURALS[noun]
    lead = Piece(_article(before[0].text), "article", m) if count == 1 else Piece(world.COUNT_WORDS[count], "count", m)
    return [lead, *before, Piece(noun, "shape", m), *after], stated


def holds(relation: str, a: scenes.ObjectSpec, b: scenes.ObjectSpec, margin: float = 6.0) -> bool:
    """Whether "a <relation> b" is true: a's centre lies ``margin`` pixels or more on that side of b's,
    along the axis where they are further apart. Anything with centre coordinates ``x``, ``y`` serves
    (the judge's `JudgedObject` too)."""
    dx, dy = b.x - a.x, b.y - a.y  # image y points down
    horizontal = abs(dx) >= abs(dy)
    return {
        "left": horizontal and dx >= margin,
        "right": horizontal and -dx >= margin,
        "above": not horizontal and dy >= margin,
        "below": not horizontal and -dy >= margin,
    }[relation]


def _relation(rng: np.random.Generator, scene: scenes.Scene, a: Mention, b: Mention) -> str | None:
    """A relation that holds between every object of ``a`` and every object of ``b``, or None."""
    true = [
        r
        for r in world.RELATIONS
        if all(holds(r, scene.objects[i], scene.objects[j]) for i in a.objects for j in b.objects)
    ]
    return _choice(rng, true) if true else None


def _relation_pieces(rng: np.random.Generator, relation: str, split: str) -> Piece:
    phrases = world.HELDOUT_RELATION_PHRASES if split == "heldout" else world.RELATION_PHRASES
    return Piece(_choice(rng, phrases[relation]), "relation")


def _rng(rng: int | np.random.Generator) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def caption(
    scene: scenes.Scene, rng: int | np.random.Generator, shape_only: float = 0.0, shape_only_captions: float = 0.0
) -> Caption:
    """A random caption of ``scene``, deterministic for a seed; its phrasebook follows ``scene.split``.

    shape_only: the share of mentions named by their shape word alone ("a heart on grass"): how a
    DreamBench prompt names a subject whose look a reference image gives. 0 (the default) keeps every
    caption as before; training captions with some let a model draw "a heart" in any look.
    shape_only_captions: the share of captions whose every mention is named so ("a heart and a star on
    sand", as a multi-subject prompt names its subjects); mentions drawn one by one rarely make one."""
    for name, share in (("shape_only", shape_only), ("shape_only_captions", shape_only_captions)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name}={share}: give a share in [0, 1] (1: every mention by its shape word alone)")
    rng = _rng(rng)
    if shape_only_captions and rng.random() < shape_only_captions:  # no draw at all when 0: captions stay as they were
        shape_only = 1.0
    groups: dict[tuple, list[int]] = {}
    for i, obj in enumerate(scene.objects):
        groups.setdefault(obj.look, []).append(i)
    order = rng.permutation(len(groups))
    grouped = [list(groups.values())[i] for i in order]
    mentions: list[Mention] = []
    phrases: list[list[Piece]] = []
    for m, members in enumerate(grouped):
        pieces, stated = _mention_pieces(rng, scene.objects[members[0]], len(members), m, shape_only)
        mentions.append(Mention(tuple(members), stated))
        phrases.append(pieces)

    pieces: list[Piece] = []
    if rng.random() < SAY_PREFIX:
        pieces.append(Piece(_choice(rng, world.PREFIXES), "prefix"))
    pieces += phrases[0]
    relations: list[tuple[int, str, int]] = []
    if len(mentions) >= 2:
        relation = _relation(rng, scene, mentions[0], mentions[1]) if rng.random() < SAY_RELATION else None
        if relation is None:
            pieces.append(Piece("and" if len(mentions) == 2 else ","))
        else:
            pieces.append(_relation_pieces(rng, relation, scene.split))
            relations.append((0, relation, 1))
        pieces += phrases[1]
        if len(mentions) == 3:
            pieces += [Piece(", and" if relation else "and"), *phrases[2]]
    if rng.random() < SAY_BACKGROUND:
        pieces.append(Piece(_choice(rng, world.BACKGROUND_PHRASES[scene.background]), "background"))
    return Caption(tuple(pieces), tuple(mentions), tuple(relations))


def sample_captioned(
    seed: int | np.random.Generator, split: str = "train", n_objects: int | None = None, shape_only: float = 0.0,
    shape_only_captions: float = 0.0, layout: str = "anywhere",
) -> tuple[scenes.Scene, Caption]:
    """A scene and its caption from one seed (see `scenes.sample_scene` and `caption` for the arguments)."""
    rng = _rng(seed)
    scene = scenes.sample_scene(rng, split, n_objects, layout)
    return scene, caption(scene, rng, shape_only, shape_only_captions)


def heldout_prompts(
    n: int = 200, seed: int = 0, shape_only: float = 0.0, layout: str = "anywhere"
) -> list[tuple[scenes.Scene, Caption]]:
    """The fixed evaluation prompts: ``n`` held-out scenes (each with an unseen color x shape pair)
    and their captions in held-out phrasing; shape_only: the share of mentions named by their shape
    word alone (1: every one, "a heart and two stars on sand", as a subject-driven prompt names its
    subject); layout: the world's (`scenes.LAYOUTS`), that of the model measured."""
    return [sample_captioned(np.random.default_rng([seed, i, 2024]), "heldout", shape_only=shape_only, layout=layout)
            for i in range(n)]  # fmt: skip


# ---- Concept-name substitution ----------------------------------------------------------------------
def with_concept(caption: Caption, mention: int, identifier: str, level: int | None = 0) -> Caption:
    """``caption`` with one mention renamed to a concept identifier plus a class word.

    ``level`` picks the class word from `world.class_path` of the mention's shape: 0 "star",
    1 "symbol", 2 "shape", 3 "object"; None keeps the identifier alone. The mention's size, colour and
    pattern words are dropped (the identifier carries the look); other spans shift accordingly.

        "a large red star above a blue box"  -- with_concept(c, 0, "<sks>") -->  "a <sks> star above a blue box"
    """
    if not 0 <= mention < len(caption.mentions):
        raise ValueError(f"Mention {mention} does not exist; this caption has {len(caption.mentions)} mentions.")
    named = caption.mentions[mention]
    if len(named.objects) != 1:
        raise ValueError(
            f"Mention {mention} counts {len(named.objects)} objects; a concept names one object. Pick a mention "
            "of a single object."
        )
    shape = named.attributes.get("shape")
    path = world.class_path(shape) if shape else ("object",)
    if level is not None and not 0 <= level < len(path):
        raise ValueError(f"level must be None or 0..{len(path) - 1} (the class path {path}), got {level}.")
    renamed = [Piece(identifier, "concept", mention)]
    if level is not None:
        renamed.append(Piece(path[level], "shape", mention))
    first = next(i for i, p in enumerate(caption.pieces) if p.mention == mention)
    lead = Piece(_article(identifier.lstrip("<")), "article", mention)
    pieces = [p for p in caption.pieces if p.mention != mention]
    pieces[first:first] = [lead, *renamed]
    stated = {"shape": shape} if level == 0 and shape else {}
    mentions = list(caption.mentions)
    mentions[mention] = replace(named, attributes=stated, concept=identifier)
    return Caption(tuple(pieces), tuple(mentions), caption.relations)


def concept_prompt(
    concept: world.PersonalConcept,
    identifier: str,
    seed: int | np.random.Generator,
    n_objects: int = 1,
    level: int | None = 0,
    layout: str = "anywhere",
) -> tuple[scenes.Scene, Caption]:
    """A scene holding ``concept`` (object 0) among other objects and its caption naming it by ``identifier``.

    The scene is the ground truth of what the prompt asks for: "a <sks> star to the left of a small
    blue circle on grass" with the concept's look on the star (``layout``: `scenes.LAYOUTS`).
    """
    rng = _rng(seed)
    scene = scenes.concept_scene(concept, rng, n_objects, layout)
    text = caption(scene, rng)
    mention = next(m for m, named in enumerate(text.mentions) if 0 in named.objects)
    return scene, with_concept(text, mention, identifier, level)


def without_identifier(caption: Caption) -> Caption:
    """``caption`` with each concept identifier dropped and its class word kept: "a sks star" -> "a star".

    The mention still records its ``concept`` (so the metrics still tell it from the other objects)
    and states its shape; the article is made to fit the class word.
    """
    pieces = [p for p in caption.pieces if p.role != "concept"]
    for i, piece in enumerate(pieces):
        if piece.role == "article" and caption.mentions[piece.mention].concept is not None:
            following = pieces[i + 1] if i + 1 < len(pieces) else None
            if following is None or following.mention != piece.mention:
                raise ValueError(f"Mention {piece.mention} of {caption.text!r} has no class word (made with level=None); nothing would name it.")
            pieces[i] = replace(piece, text=_article(following.text))
    return replace(caption, pieces=tuple(pieces))


def recontext_prompts(
    concept: world.PersonalConcept, n: int, identifier: str | None = "sks", seed: int = 7, layout: str = "anywhere"
) -> list[tuple[scenes.Scene, Caption]]:
    """The fixed recontextualization prompts of a personal concept: ``n`` (scene, caption) pairs.

    Prompt i comes from the seed sequence [seed, i]: the concept (object 0) beside 0, 1, 2 other objects
    in turn (i % 3; in the "halves" layout, which holds two at most, 0 and 1: i % 2), on a varied
    background. The caption names the concept by ``identifier`` and its class word, "a sks star to the
    left of a small blue circle on grass", or with ``identifier=None`` by the class word alone, "a star
    to the left of ...": the same scenes and words otherwise.
    """
    most = scenes.max_objects(layout)
    pairs = [concept_prompt(concept, identifier or "sks", np.random.default_rng([seed, i]), n_objects=1 + i % most, layout=layout)
             for i in range(n)]  # fmt: skip
    return pairs if identifier else [(scene, without_identifier(named)) for scene, named in pairs]


def shape_words(caption: Caption, mention: int) -> tuple[str, int]:
    """(the mention's shape phrase, how many times that phrase stands earlier in the caption): what
    `minigen.text.spans.token_span` needs to find this mention's own shape word ("star", occurrence 1)."""
    words = caption.words()
    picked = [i for i, w in enumerate(words) if w.mention == mention and w.role == "shape"]
    phrase = [words[i].text for i in picked]
    earlier = sum(1 for i in range(picked[0]) if [w.text for w in words[i : i + len(phrase)]] == phrase)
    return " ".join(phrase), earlier
