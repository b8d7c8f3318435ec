"""The words of the shapes world: every phrase a caption can use, which of them training sees, and which are held out.

Why a module of its own: ELLA's claim is that the LLM brings language understanding, so a connector
trained on varied wording should read phrasings it never saw. Testing that needs a clean line
between the language of training and the language of the test, kept in one place that tests can
check exhaustively. ``captions.py`` is the grammar that combines these words; it has none of its own.

Training language (``TRAIN``, and every constant not named ``HELDOUT…``)
    Positions, in four vocabularies drawn independently per mention, for all nine cells:
    corner/edge names ("in the top left corner", "at the upper-left", "in the middle of the top edge",
    "at the middle right", "in the center"); rows and columns ("in the top row, left column",
    "in the center column of the bottom row"); numbered rows and columns, counted from the top and
    from the left ("in row 1, column 3", "in the first row, third column"); and words relative to
    the centre cell ("above and to the left of the center", "directly below the center").
    Sizes large = large/big, small = small/little/tiny; relations "to the left of", "over",
    "beneath" …; backgrounds "on a white background", "the backdrop is gray" ….

Held-out language (``HELDOUT`` and the ``HELDOUT_*`` constants) — no training caption contains any of it
    Position phrases, for every cell (``HELDOUT.places``):
      * region nouns: "in the top-left region", "in the upper-left area", "in the top-centre region",
        "in the upper-central area", "in the centre-left region", "in the middle-left area",
        "in the central region", "in the central area";
      * two locatives: "at the top on the left", "at the bottom, on the right side",
        "at the top in the centre", "at the top, halfway across", "halfway up on the left",
        "on the left at mid-height", "in the dead centre", "exactly in the centre";
      * height words: "high on the left", "high up on the right", "low on the left",
        "low down on the right", "high up in the centre", "high in the middle",
        "low down in the centre", "low in the middle", "on the far left, at mid-height",
        "at mid-height on the far right", "at the centre point".
    Sizes large = huge/giant, small = miniature. Relations "farther left than", "further to the
    right than", "higher (up) than", "lower (down) than". Backgrounds "on a white canvas",
    "set against white", "with white all around", "the canvas is white", "the rest of the image is
    white", "everything else is white".
    Sentence-structure families (frames ``HELDOUT_*``; ``captions.HELDOUT_FAMILIES``):
      * ``inversion`` — locative inversion: "In the top-left region sits a huge red circle." (the place
        first, then sits/rests/lies and the subject; training never starts a sentence with a place);
      * ``imagine`` — "Imagine a white canvas with …", "Picture this: …", "Imagine a picture in which …";
      * ``passive`` — "A huge red circle is positioned / is located / can be found / has been placed …";
      * ``subject`` — the place as subject: "The thing in the central region is a miniature blue
        square.", "The items … are …".
    ``HELDOUT_ONLY_WORDS`` is every word the held-out language has and training lacks — exactly: across,
    area, around, be, been, behind, canvas, central, centre, dead, else, everything, exactly, far,
    farther, found, further, giant, halfway, has, have, height, high, higher, huge, imagine, item,
    items, lie, lies, located, low, mid, miniature, painted, placed, point, positioned, region, rest,
    rests, set, sit, sits, than, thing, things, this. A few held-out phrases use only training words
    ("at the top on the left"): there the phrase as a whole is what training never saw.
    The held-out phrases were chosen for meanings an LLM's general English carries ("centre" ~
    "center", "region"/"area" ~ "corner", "high" ~ "top"), not world knowledge such as compass points.

``VOCABULARY`` is every word any generator can emit (lowercased); ``unknown_words`` reports the
content words of a prompt outside it, so a user learns which words the shipped model has never seen.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from ..prompts import parse_weights, plain_text, prompt_variants
from .world import BACKGROUNDS, COLOURS, COLS, PLURALS, SHAPES, SIZES

Cell = tuple[int, int]
CELLS: tuple[Cell, ...] = tuple((r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class Place:
    """One way to say where a cell is.

    ``prep`` follows a noun ("a circle *in the top left corner*"); ``tag`` is the bare form for terse
    tags and fields ("top left corner"), or "" where the phrase only works with its preposition.
    """

    prep: str
    tag: str = ""

    @property
    def bare(self) -> str:
        return self.tag or self.prep


Places = dict[Cell, tuple[Place, ...]]


def _table(phrases) -> Places:
    return {cell: tuple(phrases(*cell)) for cell in CELLS}


# --- training position vocabularies ------------------------------------------------------------


def _names(row: int, col: int) -> list[Place]:
    """Corner and edge names: "top left corner", "middle of the top edge", "middle right", "center"."""
    if (row, col) == (1, 1):
        return [
            Place("in the center", "center"),
            Place("in the middle", "middle"),
            Place("in the middle of the image", "middle of the image"),
            Place("in the very middle", "very middle"),
            Place("at the very center", "very center"),
            Place("in the center of the picture", "center of the picture"),
        ]
    side = COLS[col]
    if row != 1 and col != 1:
        out = []
        for v in (("top", "upper"), (), ("bottom", "lower"))[row]:
            out += [
                Place(f"in the {v} {side} corner", f"{v} {side} corner"),
                Place(f"in the {v}-{side} corner", f"{v}-{side} corner"),
                Place(f"at the {v} {side}", f"{v} {side}"),
                Place(f"at the {v}-{side}", f"{v}-{side}"),
            ]
        return out
    if row != 1:
        edge, v = ("top", "upper") if row == 0 else ("bottom", "lower")
        return [
            Place(f"at the {edge} center", f"{edge} center"),
            Place(f"in the {edge} middle", f"{edge} middle"),
            Place(f"in the middle of the {edge} edge", f"middle of the {edge} edge"),
            Place(f"at the center of the {edge} edge", f"center of the {edge} edge"),
            Place(f"at the {v} center", f"{v} center"),
        ]
    return [
        Place(f"at the middle {side}", f"middle {side}"),
        Place(f"at the center {side}", f"center {side}"),
        Place(f"in the middle of the {side} side", f"middle of the {side} side"),
        Place(f"in the middle of the {side} edge", f"middle of the {side} edge"),
    ]


def _rows_and_columns(row: int, col: int) -> list[Place]:
    """ "in the top row, left column", "in the center column of the bottom row" …"""
    r = ("top", "middle", "bottom")[row]
    out = []
    for c in (("left",), ("center", "middle"), ("right",))[col]:
        out += [
            Place(f"in the {r} row, {c} column", f"{r} row, {c} column"),
            Place(f"in the {c} column of the {r} row", f"{c} column of the {r} row"),
            Place(f"in the {c} column, {r} row", f"{c} column, {r} row"),
        ]
    return out


ORDINALS = ("first", "second", "third")


def _numbered(row: int, col: int) -> list[Place]:
    """Rows counted from the top and columns from the left, 1-3: "in row 1, column 3"."""
    i, j, oi, oj = row + 1, col + 1, ORDINALS[row], ORDINALS[col]
    return [
        Place(f"in row {i}, column {j}", f"row {i}, column {j}"),
        Place(f"at row {i}, column {j}", f"row {i} column {j}"),
        Place(f"in the {oi} row, {oj} column", f"{oi} row, {oj} column"),
        Place(f"in column {j} of row {i}", f"column {j} of row {i}"),
    ]


def _relative(row: int, col: int) -> list[Place]:
    """Relative to the centre cell: "above and to the left of the center", "directly below the center"."""
    if (row, col) == (1, 1):
        return [Place("at the center", "center")]
    side = COLS[col]
    if row != 1 and col != 1:
        v, move = ("above", "up") if row == 0 else ("below", "down")
        return [
            Place(f"{v} and to the {side} of the center", f"{v} and {side} of center"),
            Place(f"{move} and to the {side} of the center"),
        ]
    if row != 1:
        v = ("above", "below")[row // 2]
        return [Place(f"directly {v} the center", f"{v} center"), Place(f"straight {v} the center")]
    return [Place(f"directly {side} of the center", f"{side} of center"), Place(f"to the {side} of the center")]


# --- held-out position vocabularies --------------------------------------------------------------


def _regions(row: int, col: int) -> list[Place]:
    """Region nouns: "in the top-left region", "in the middle-left area", "in the central region"."""
    if (row, col) == (1, 1):
        return [Place("in the central region", "central region"), Place("in the central area", "central area")]
    side = COLS[col]
    if row != 1 and col != 1:
        out = []
        for v in (("top", "upper"), (), ("bottom", "lower"))[row]:
            out += [Place(f"in the {v}-{side} region", f"{v}-{side} region"), Place(f"in the {v}-{side} area")]
        return out
    if row != 1:
        edge, v = ("top", "upper") if row == 0 else ("bottom", "lower")
        return [Place(f"in the {edge}-centre region", f"{edge}-centre region"), Place(f"in the {v}-central area")]
    return [Place(f"in the centre-{side} region", f"centre-{side} region"), Place(f"in the middle-{side} area")]


def _two_locatives(row: int, col: int) -> list[Place]:
    """A height and a side said apart: "at the top on the left", "halfway up on the right"."""
    if (row, col) == (1, 1):
        return [Place("in the dead centre", "dead centre"), Place("exactly in the centre")]
    side = COLS[col]
    if row != 1:
        edge = ("top", "bottom")[row // 2]
        if col == 1:
            return [Place(f"at the {edge} in the centre"), Place(f"at the {edge}, halfway across")]
        return [Place(f"at the {edge} on the {side}"), Place(f"at the {edge}, on the {side} side")]
    return [Place(f"halfway up on the {side}"), Place(f"on the {side} at mid-height")]


def _heights(row: int, col: int) -> list[Place]:
    """Height words: "high on the left", "low down in the centre", "at mid-height on the far right"."""
    if (row, col) == (1, 1):
        return [Place("at the centre point", "centre point")]
    side = COLS[col]
    if row == 1:
        return [Place(f"on the far {side}, at mid-height"), Place(f"at mid-height on the far {side}")]
    high, up = ("high", "high up") if row == 0 else ("low", "low down")
    if col == 1:
        return [Place(f"{up} in the centre"), Place(f"{high} in the middle")]
    return [Place(f"{high} on the {side}"), Place(f"{up} on the {side}")]


@dataclass(frozen=True, eq=False)
class Lexicon:
    """The words for each fact; a caption family says the same facts with whichever lexicon it is given.

    ``places`` maps a vocabulary name to its phrases for every cell: a mention first draws a
    vocabulary, then a phrase, so each vocabulary gets an equal share however many variants it has.
    """

    name: str
    places: dict[str, Places]
    sizes: dict[str, tuple[str, ...]]
    relations: dict[str, tuple[str, ...]]
    bg_nouns: tuple[str, ...]  # "background": what "a white ___" is
    bg_with: tuple[str, ...]  # follows a list: "on a {bg} {noun}"
    bg_sentences: tuple[str, ...]  # a sentence of its own
    bg_tags: tuple[str, ...]  # a terse tag

    def place(self, cell: Cell, rng: random.Random) -> Place:
        return rng.choice(self.places[rng.choice(self._vocabularies)][cell])

    @property
    def _vocabularies(self) -> tuple[str, ...]:
        return tuple(self.places)

    def strings(self) -> Iterator[str]:
        """Every phrase this lexicon can emit (not its own or its vocabularies' names)."""
        yield from _strings([list(self.places.values()), self.sizes, self.relations])
        yield from _strings([self.bg_nouns, self.bg_with, self.bg_sentences, self.bg_tags])

    def all_places(self) -> Iterator[tuple[Cell, Place]]:
        for table in self.places.values():
            for cell, phrases in table.items():
                for p in phrases:
                    yield cell, p


TRAIN = Lexicon(
    name="train",
    places={
        "names": _table(_names),
        "rows_and_columns": _table(_rows_and_columns),
        "numbered": _table(_numbered),
        "relative": _table(_relative),
    },
    sizes={"large": ("large", "big"), "small": ("small", "little", "tiny")},
    relations={
        "left of": ("to the left of", "left of", "on the left side of"),
        "right of": ("to the right of", "right of", "on the right side of"),
        "above": ("above", "over"),
        "below": ("below", "beneath", "under", "underneath"),
    },
    bg_nouns=("background", "backdrop"),
    bg_with=("on a {bg} {noun}", "against a {bg} {noun}", "on a plain {bg} {noun}"),
    bg_sentences=("The {noun} is {bg}.", "The {noun} is plain {bg}.", "It is all on a {bg} {noun}."),
    bg_tags=("{bg} {noun}", "{noun}: {bg}", "{noun} {bg}"),
)

HELDOUT = Lexicon(
    name="heldout",
    places={"regions": _table(_regions), "two_locatives": _table(_two_locatives), "heights": _table(_heights)},
    sizes={"large": ("huge", "giant"), "small": ("miniature",)},
    relations={
        "left of": ("farther left than", "further to the left than"),
        "right of": ("farther right than", "further to the right than"),
        "above": ("higher than", "higher up than"),
        "below": ("lower than", "lower down than"),
    },
    bg_nouns=("canvas",),
    bg_with=("on a {bg} {noun}", "set against {bg}", "with {bg} all around"),
    bg_sentences=("The {noun} is {bg}.", "The rest of the image is {bg}.", "Everything else is {bg}."),
    bg_tags=("{bg} {noun}",),
)

# --- counts, nouns, relations and totals (shared by every family) ------------------------------

NUMBERS = {1: "one", 2: "two", 3: "three"}
#: How a group's count can be said: a word, a numeral or a collective.
COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3", "a trio of")}
#: A plural whose count is deliberately not stated (under-specified captions).
VAGUE_PLURALS = ("some", "several", "")
TOTALS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(n) for n in range(10))
#: Noun phrases: Q = article/count, S = size word and a space (or nothing), C = colour, N = noun.
NOUN_PHRASES = ("{Q} {S}{C} {N}", "{Q} {C} {S}{N}", "{Q} {S}{N} colored {C}", "{Q} {S}{N} in {C}")
NOUN_PHRASES_COUNTED = ("{Q} identical {S}{C} {N}",)  # only where the count is said
SINGLE_ARTICLES = ("a", "a", "one")
AN = "an"  # "a" before a vowel
ONE_EACH = "one {}"  # "two squares, one in … and one in …"; with fewer places than members, the rest are open
ONE_OF_THEM = "one of them {}"  # "three squares, one of them in …"
AND = "and"

REL_SENTENCES = ("The {a} is {r} the {b}.", "The {a} appears {r} the {b}.", "Note that the {a} is {r} the {b}.")
REL_TAGS = ("{a} {r} {b}",)
TOTAL_SENTENCES = (
    "There are {n} objects in total.",
    "{N} shapes in all.",
    "That makes {n} objects.",
    "{N} objects altogether.",
)
TOTAL_TAGS = ("{n} objects", "{n} shapes")

# --- training sentence-structure families (see captions.py for how each combines its frames) ---

LIST_BG_FIRST = (
    "A {bg} {noun} with {list}.",
    "On a {bg} {noun}: {list}.",
    "An image on a {bg} {noun} showing {list}.",
    "A picture with a {bg} {noun} and {list}.",
)
LIST_BG_LAST = ("{List}, all {bg_with}.", "{List} {bg_with}.", "An image of {list} {bg_with}.", "{List}. {bg_sentence}")
LIST_NO_BG = ("{List}.", "An image of {list}.", "A picture of {list}.", "A scene with {list}.")

#: One sentence per object: (singular, plural) frames.
OBJECT_SENTENCES = (
    ("There is {}.", "There are {}."),
    ("You can see {}.", "You can see {}."),
    ("The picture shows {}.", "The picture shows {}."),
    ("We see {}.", "We see {}."),
    ("The image contains {}.", "The image contains {}."),
)
OBJECT_PREDICATES = ("{} is {}.", "{} are {}.")  # "A red circle is in the top left corner."

#: Relative clauses: (singular, plural); the size may get a clause of its own ("that is large and …").
RELATIVE_CLAUSES = (
    ("{np} that is {where}", "{np} that are {where}"),
    ("{np}, which is {where}", "{np}, which are {where}"),
    ("{np} which appears {where}", "{np} which appear {where}"),
)
RELATIVE_SIZE = ("{np} that is {size} and {where}", "{np} that are {size} and {where}")
RELATIVE_SIZE_ONLY = ("{np} that is {size}", "{np} that are {size}")
RELATIVE_PARTIAL = ("{np}, one of which is {where}",)  # one member placed, the others open
RELATIVE_LIST = ("The image shows {list}.", "It shows {list}.", "There is {list}.")

IMPERATIVE_LIST = (
    "Draw {list}.",
    "Make an image with {list}.",
    "Create a picture of {list}.",
    "Show {list}.",
    "Paint {list}.",
)
IMPERATIVE_EACH = ("Draw {}.", "Add {}.", "Put {}.", "Paint {}.")
IMPERATIVE_BG = ("Use a {bg} {noun}.", "Make the {noun} {bg}.", "Give it a {bg} {noun}.")

CHAIN_CLAUSES = ("{np} is {where}", "{np} are {where}")
CHAIN_UNPLACED = ("there is {np}", "there are {np}")
CHAIN_JOINS = (", and ", ", while ", ", whereas ", "; ")
CHAIN_BG_FIRST = ("On a {bg} {noun}, {chain}.",)
CHAIN_BG_LAST = ("{Chain}, all {bg_with}.", "{Chain}, and the {noun} is {bg}.")

FIELD_GROUP = "{Noun}: {fields}."  # "Circle: red, large, top left."
FIELD_OBJECTS = ("Objects: {}.", "Shapes: {}.", "Contents: {}.")
FIELD_BG = ("{Noun}: {bg}.",)

# --- held-out sentence-structure families -------------------------------------------------------

HELDOUT_INVERSION = (("sits", "sit"), ("rests", "rest"), ("lies", "lie"))  # "{Where} sits {np}."
HELDOUT_INVERSION_BG = ("Behind them all lies a {bg} {noun}.", "Beneath everything lies a {bg} {noun}.")
HELDOUT_IMAGINE = (
    "Imagine a {bg} {noun} with {list}.",
    "Imagine {list}, all {bg_with}.",
    "Picture this: {list}, {bg_with}.",
    "Imagine a picture in which {clauses}, and the {noun} is {bg}.",
)
HELDOUT_PASSIVE = (
    ("{} is positioned {}.", "{} are positioned {}."),
    ("{} is located {}.", "{} are located {}."),
    ("{} can be found {}.", "{} can be found {}."),
    ("{} has been placed {}.", "{} have been placed {}."),
)
HELDOUT_PASSIVE_BG = ("The {noun} is painted {bg}.", "The {noun} has been painted {bg}.")
HELDOUT_SUBJECT = (
    ("The thing {} is {}.", "The things {} are {}."),
    ("The item {} is {}.", "The items {} are {}."),
)
HELDOUT_REL_SENTENCES = ("The {a} is {r} the {b}.", "The {a} sits {r} the {b}.")
HELDOUT_TOTALS = ("{N} things in all.", "That is {n} items altogether.")
#: Every held-out family caption contains one of these (words or phrases); no training caption does.
HELDOUT_FAMILY_MARKERS = (
    "sits",
    "sit",
    "rests",
    "rest",
    "lies",
    "lie",
    "imagine",
    "picture this",
    "positioned",
    "located",
    "can be found",
    "placed",
    "thing",
    "things",
    "item",
    "items",
)

# --- vocabulary ----------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+|\d+")
_PLACEHOLDER = re.compile(r"\{[^}]*\}")


def words(text: str) -> list[str]:
    """The lowercased words of a text: runs of letters, and numbers ("top-left" is "top", "left")."""
    return _WORD.findall(text.lower())


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield _PLACEHOLDER.sub(" ", value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (tuple, list, set, frozenset)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, Lexicon):
        yield from value.strings()
    elif isinstance(value, Place):
        yield from (value.prep, value.tag)


def _vocabulary(held_out: bool) -> frozenset[str]:
    """The words of every table above (scanned, so a new table can't be forgotten), split train/held-out."""
    tables = [v for k, v in globals().items() if k.isupper() and k.startswith("HELDOUT") == held_out]
    if not held_out:
        tables += [SHAPES, PLURALS, COLOURS, BACKGROUNDS, SIZES]
    return frozenset(w for s in _strings(tables) for w in words(s))


#: Every word a training caption can contain.
TRAIN_VOCABULARY: frozenset[str] = _vocabulary(held_out=False)
#: Every word the held-out language can use that training never does.
HELDOUT_ONLY_WORDS: frozenset[str] = _vocabulary(held_out=True) - TRAIN_VOCABULARY
#: Every word any generator (training or held-out) can emit, lowercased.
VOCABULARY: frozenset[str] = TRAIN_VOCABULARY | HELDOUT_ONLY_WORDS

_FUNCTION_WORDS = """
    a an the this that these those some any each every all both either neither no not none other another
    such own same several many much more most few less least only just very too also even quite rather
    and or but nor so yet if then than because while whereas although though as of in on at to from by
    with without into onto upon over under about above below between among through across behind before
    after near next beside besides around along against toward towards within inside outside up down off
    out there here where when how what which who whom whose why is are was were be been being am has have
    had do does did can could will would shall should may might must let it its they them their we us our
    you your he him his she her i me my mine one ones something anything nothing everything thing things
    please show shows showing make makes create draw drawing generate render picture image photo scene
    view containing contains depicts depicting featuring features shown having
"""
#: Words any English prompt may contain without being about the picture; never reported as unknown.
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def unknown_words(prompt: str) -> list[str]:
    """The prompt's content words outside the world's vocabulary, in order, each once.

    "a pink star and a black horse" -> ["pink", "star", "horse"]: the shipped model has never seen
    them, so it can only guess. Function words ("a", "the", "with" …) are never reported.
    """

    out: list[str] = []
    for variant in prompt_variants(prompt):  # what the LLM reads: A1111 editing and emphasis resolved
        for w in words(plain_text(parse_weights(variant))):
            if w not in VOCABULARY and w not in FUNCTION_WORDS and w not in out:
                out.append(w)
    return out


class UnknownWordsWarning(UserWarning):
    """A prompt for the shapes model uses words its world never had (it can only guess at them)."""


def warn_unknown_words(prompts: list[str]) -> None:
    """One warning per prompt that has words outside the world's vocabulary, naming them: the model will
    not draw "a pink star" (no pink, no stars), and the user should know why rather than get a silent guess."""
    for i, prompt in enumerate(prompts):
        unknown = unknown_words(prompt)
        if unknown:
            warnings.warn(
                f"prompt {i}: the shapes model has never seen {', '.join(repr(w) for w in unknown)} (its world: "
                "circles, squares, triangles, diamonds, crosses in six colours on a 3x3 grid); it can only guess",
                UnknownWordsWarning,
                stacklevel=2,
            )


# --- length ------------------------------------------------------------------------------------

_PIECE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """MiniLM's token count of ``text``, [CLS] and [SEP] included, without loading its tokenizer.

    Exact for the world's language: BERT's basic tokenizer splits words from each punctuation
    mark, and every word of ``VOCABULARY`` is one word piece (the tests check both with the real
    tokenizer). Cheap enough to keep every caption within ``captions.MAX_TOKENS`` as it is built.
    """
    return len(_PIECE.findall(text)) + 2
