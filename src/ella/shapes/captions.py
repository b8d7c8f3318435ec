"""Captions of shapes scenes: the training distribution, and the prompt kinds that test what the model learned.

Why so many independent axes: the connector should learn the *meaning* of a caption, not one
template's word positions. Each caption draws, independently from its ``rng``: a sentence-structure
family, the order of the objects, each noun phrase's form (attribute order, size synonym, count as
a word, a numeral or "a pair of"), each position's vocabulary and phrase (``language.py``), where the
background goes (first, last, or left out), and whether one or two relations and the total are
added. Every fact is stated unless it is deliberately left out: with ``UNDERSPECIFIED_RATE`` a
caption omits positions, sizes, counts or the background of some or all objects — the image still
shows the full scene, so the model learns to choose for itself what a prompt leaves open.

Training families (``TRAIN_FAMILIES``): ``list`` (one list sentence), ``objects`` (one sentence per
object: "There is …", "You can see …", "A red circle is …"), ``relative`` ("a red circle that is …",
"…, which is …"), ``imperative`` ("Draw …", "Make an image with …"), ``chained`` (one long sentence
of clauses: ", while …, whereas …"), ``tags`` ("red circle, top left, large; blue square, center;
white background") and ``fields`` ("Circle: red, large, top left." / "Objects: …; … Background: …").
Held-out families (``HELDOUT_FAMILIES``: ``inversion``, ``imagine``, ``passive``, ``subject``) and the
held-out phrases are listed in ``language.py``; no training caption uses them.

Every caption comes with the record of what it states (``Caption.specified``), which is what
``questions.questions(scene, specified)`` asks about. Captions stay within ``MAX_TOKENS`` MiniLM
tokens (the connector reads 128) for scenes of up to five objects.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..errors import EllaError
from . import language as L
from .language import HELDOUT, TRAIN, Lexicon, Place, estimate_tokens
from .world import INVERSE, PLURALS, Group, Scene, derived_rng, scene_for

NUMBERS = L.NUMBERS
TRAIN_FAMILIES = ("list", "objects", "relative", "imperative", "chained", "tags", "fields")
HELDOUT_FAMILIES = ("inversion", "imagine", "passive", "subject")
#: Evaluation prompt kinds: ``train`` (training language, every fact), ``heldout`` (held-out families
#: and held-out phrases, every fact), ``terse`` (the tags family, every fact), ``underspecified``
#: (training language, some facts left out), and two diagnostics that hold out one side only:
#: ``heldout_phrases`` (training families, held-out phrases) and ``heldout_families`` (the reverse).
KINDS = ("train", "heldout", "terse", "underspecified", "heldout_phrases", "heldout_families")
#: Fraction of training captions that leave some facts out.
UNDERSPECIFIED_RATE = 0.2
#: Longest caption in MiniLM tokens ([CLS] and [SEP] included): the connector reads 128.
MAX_TOKENS = 120
#: Chance that a caption adds one or two relations between single objects, and the total.
RELATION_RATE, TOTAL_RATE = 0.5, 0.3


@dataclass(frozen=True)
class GroupSpec:
    """Which facts of one group (one shape) a caption states; entity and colour always are.

    ``cells`` follows ``Group.cells``; ``count`` is True for single objects ("a circle" says one).
    """

    shape: str
    size: bool = True
    count: bool = True
    cells: tuple[bool, ...] = (True,)

    @property
    def full(self) -> bool:
        return self.size and self.count and all(self.cells)


@dataclass(frozen=True)
class Specified:
    """What a caption states: per group (``scene.groups()`` order), the background, the relations it says."""

    background: bool
    groups: tuple[GroupSpec, ...]
    relations: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def everything(cls, scene: Scene) -> Specified:
        return cls(True, tuple(GroupSpec(g.shape, cells=(True,) * g.count) for g in scene.groups()))

    @property
    def full(self) -> bool:
        return self.background and all(g.full for g in self.groups)

    def of(self, shape: str) -> GroupSpec:
        for g in self.groups:
            if g.shape == shape:
                return g
        raise EllaError(f"this caption's record has no {shape}; it covers {', '.join(g.shape for g in self.groups)}")

    def states_relation(self, a: str, relation: str, b: str) -> bool:
        return (a, relation, b) in self.relations or (b, INVERSE[relation], a) in self.relations

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Specified:
        try:
            groups = tuple(GroupSpec(g["shape"], g["size"], g["count"], tuple(g["cells"])) for g in data["groups"])
            relations = tuple(tuple(r) for r in data.get("relations", ()))
            return cls(bool(data["background"]), groups, relations)
        except (KeyError, TypeError) as err:
            raise EllaError(
                f"not a caption record (need background and groups[shape, size, count, cells]): {err}"
            ) from None


@dataclass(frozen=True)
class Caption:
    """A caption, the record of what it states, its family and, per group, the words that state it.

    ``mentions`` follows ``scene.groups()``: each is a substring of ``text`` holding every fact the
    caption states about that group (and nothing about another), so a reader can check the record.
    """

    text: str
    specified: Specified
    family: str  # one of TRAIN_FAMILIES or HELDOUT_FAMILIES
    lexicon: str  # "train" or "heldout": whose words
    mentions: tuple[str, ...] = field(repr=False, default=())


# --- the pieces of one group ----------------------------------------------------------------------


@dataclass
class _Group:
    """One group as a caption says it: chosen words, filled in as the family builds its mention."""

    group: Group
    spec: GroupSpec
    size: str  # the size word, "" when the size is not stated
    count: str  # "a"/"one" for single objects; a count word, or a vague/empty one when not stated
    places: list[Place]  # one per stated cell, in random order
    mention: str = ""

    @property
    def plural(self) -> bool:
        return self.group.count > 1


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c" — or "a; b; and c" when an item has commas of its own; "" for none."""
    if len(items) <= 2:
        return f" {L.AND} ".join(items)
    if any("," in item for item in items):
        return "; ".join(items[:-1]) + f"; {L.AND} " + items[-1]
    return ", ".join(items[:-1]) + f" {L.AND} " + items[-1]


def _bare_places(g: _Group) -> str:
    """The stated places as tags, "top left and center and row 3, column 1": no list commas inside a field."""
    return f" {L.AND} ".join(p.bare for p in g.places)


def _noun(g: _Group, rng: random.Random, size: bool = True) -> str:
    """Count, size, colour and shape: "a big red circle", "two small squares colored blue", "some circles"."""
    forms = L.NOUN_PHRASES + (L.NOUN_PHRASES_COUNTED if g.plural and g.spec.count else ())
    text = rng.choice(forms).format(
        Q=g.count,
        S=f"{g.size} " if size and g.size else "",
        C=g.group.colour,
        N=PLURALS[g.group.shape] if g.plural else g.group.shape,
    )
    text = text.strip()
    if text.startswith("a ") and text[2] in "aeiou":
        text = f"{L.AN} {text[2:]}"
    return text


def _where(g: _Group, rng: random.Random) -> str:
    """The group's stated places after its noun: " in the center", ", one in … and one in …", or ""."""
    ps = [p.prep for p in g.places]
    if not ps:
        return ""
    if not g.plural:
        return f" {ps[0]}"
    if len(ps) == 1 and rng.random() < 0.5:  # one member placed, the others left open
        return ", " + L.ONE_OF_THEM.format(ps[0])
    if len(ps) < g.group.count or (g.spec.count and rng.random() < 0.5):
        return ", " + _join([L.ONE_EACH.format(p) for p in ps])
    return f" {_join(ps)}"


def _places(g: _Group) -> str:
    """Every stated place joined ("in the top left and in row 2, column 3"), for frames that need all at once."""
    return _join([p.prep for p in g.places])


def _item(g: _Group, rng: random.Random) -> str:
    g.mention = _noun(g, rng) + _where(g, rng)
    return g.mention


def _one_of(frames: tuple[tuple[str, str], ...] | tuple[str, str], g: _Group, rng: random.Random) -> str:
    """Pick a (singular, plural) frame pair and take the form the group needs."""
    pair = rng.choice(frames) if isinstance(frames[0], tuple) else frames
    return pair[1] if g.plural else pair[0]


def _bg(lex: Lexicon, bg: str, rng: random.Random) -> dict[str, str]:
    noun = rng.choice(lex.bg_nouns)
    return {
        "bg": bg,
        "noun": noun,
        "bg_with": rng.choice(lex.bg_with).format(bg=bg, noun=noun),
        "bg_sentence": rng.choice(lex.bg_sentences).format(bg=bg, noun=noun),
    }


# --- training families: each returns its parts (sentences or tags) and the separator between them --


def _list(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    items = _join([_item(g, rng) for g in gs])
    if bg is None:
        frame = rng.choice(L.LIST_NO_BG)
    else:
        frame = rng.choice(L.LIST_BG_FIRST if rng.random() < 0.5 else L.LIST_BG_LAST)
    return [frame.format(list=items, List=_cap(items), **(_bg(lex, bg, rng) if bg is not None else {}))], " "


def _objects(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    parts = []
    for g in gs:
        noun = _noun(g, rng)
        if g.places and len(g.places) == g.group.count and rng.random() < 0.3:  # "Two red squares are in … and …"
            g.mention = _one_of(L.OBJECT_PREDICATES, g, rng).format(_cap(noun), _places(g))[:-1]
            parts.append(g.mention + ".")
        else:
            g.mention = noun + _where(g, rng)
            parts.append(_one_of(L.OBJECT_SENTENCES, g, rng).format(g.mention))
    if bg is not None:
        parts.insert(rng.choice((0, len(parts))), _bg(lex, bg, rng)["bg_sentence"])
    return parts, " "


def _relative_clause(g: _Group, rng: random.Random) -> str:
    k = 1 if g.plural else 0
    if g.places and len(g.places) < g.group.count:  # some members placed, the others open
        np = _noun(g, rng)
        if len(g.places) == 1 and rng.random() < 0.5:
            return rng.choice(L.RELATIVE_PARTIAL).format(np=np, where=_places(g))
        return np + _where(g, rng)
    if g.size and rng.random() < 0.4:  # the size in a clause of its own
        np = _noun(g, rng, size=False)
        if g.places:
            return L.RELATIVE_SIZE[k].format(np=np, size=g.size, where=_places(g))
        return L.RELATIVE_SIZE_ONLY[k].format(np=np, size=g.size)
    np = _noun(g, rng)
    if not g.places:
        return np
    return rng.choice(L.RELATIVE_CLAUSES)[k].format(np=np, where=_places(g))


def _relative(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    for g in gs:
        g.mention = _relative_clause(g, rng)
    if rng.random() < 0.5:
        parts = [rng.choice(L.RELATIVE_LIST).format(list=_join([g.mention for g in gs]))]
    else:
        parts = [_one_of(L.OBJECT_SENTENCES, g, rng).format(g.mention) for g in gs]
    if bg is not None:
        parts.insert(rng.choice((0, len(parts))), _bg(lex, bg, rng)["bg_sentence"])
    return parts, " "


def _imperative(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    words = _bg(lex, bg, rng) if bg is not None else {}
    if rng.random() < 0.5:
        items = _join([_item(g, rng) for g in gs])
        sentence = rng.choice(L.IMPERATIVE_LIST).format(list=items)
        if bg is not None and rng.random() < 0.5:
            return [f"{sentence[:-1]} {words['bg_with']}."], " "
        parts = [sentence]
    else:
        parts = [rng.choice(L.IMPERATIVE_EACH).format(_item(g, rng)) for g in gs]
    if bg is not None:
        bg_sentence = rng.choice(L.IMPERATIVE_BG).format(**words)
        parts.insert(rng.choice((0, len(parts))), bg_sentence)
    return parts, " "


def _chained(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    clauses = []
    for g in gs:
        np = _noun(g, rng)
        if not g.places:
            g.mention = _one_of(L.CHAIN_UNPLACED, g, rng).format(np=np)
        elif len(g.places) < g.group.count:
            g.mention = np + _where(g, rng)
        else:
            g.mention = _one_of(L.CHAIN_CLAUSES, g, rng).format(np=np, where=_places(g))
        clauses.append(g.mention)
    chain = clauses[0]
    for i, clause in enumerate(clauses[1:], start=2):
        chain += (", and " if i == len(clauses) else rng.choice(L.CHAIN_JOINS)) + clause
    if bg is None:
        return [_cap(chain) + "."], " "
    frame = rng.choice(L.CHAIN_BG_FIRST + L.CHAIN_BG_LAST)
    return [frame.format(chain=chain, Chain=_cap(chain), **_bg(lex, bg, rng))], " "


def _tag_fields(g: _Group, rng: random.Random, size_first: bool) -> list[str]:
    """A group's tag fields: the noun first ("red circle", "2 blue squares"), then size and places in any order.

    ``size_first`` keeps the size in the noun ("large red circle"), for tags whose fields are only spaced apart.
    """
    colour, noun = g.group.colour, PLURALS[g.group.shape] if g.plural else g.group.shape
    count = f"{g.count} " if g.plural and g.spec.count else ""
    rest = [_bare_places(g)] if g.places else []
    if g.size and (size_first or rng.random() < 0.5):
        head = f"{count}{g.size} {colour} {noun}"
    else:
        head = f"{count}{colour} {noun}"
        rest += [g.size] if g.size else []
    rng.shuffle(rest)
    return [head, *rest]


def _tags(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    # "red circle, top left, large; …" or, where no place has a comma, "large red circle top left, …"
    spaced = rng.random() < 0.5
    fields = [_tag_fields(g, rng, size_first=spaced) for g in gs]
    spaced = spaced and not any("," in f for fs in fields for f in fs)
    for g, fs in zip(gs, fields):
        g.mention = (" " if spaced else ", ").join(fs)
    parts = [g.mention for g in gs]
    if bg is not None:
        tag = rng.choice(lex.bg_tags).format(bg=bg, noun=rng.choice(lex.bg_nouns))
        parts.insert(rng.choice((0, len(parts))), tag)
    return parts, ", " if spaced else "; "


def _fields(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    if rng.random() < 0.5:  # "Circle: red, large, top left." / "Squares: 2, blue, center and bottom right."
        parts = []
        for g in gs:
            count = [rng.choice(L.COUNT_WORDS[g.group.count][:2])] if g.plural and g.spec.count else []
            rest = ([g.size] if g.size else []) + ([_bare_places(g)] if g.places else [])
            rng.shuffle(rest)
            values = [*count, g.group.colour, *rest]
            sep = "; " if any("," in v for v in values) else ", "
            noun = PLURALS[g.group.shape] if g.plural else g.group.shape
            g.mention = L.FIELD_GROUP.format(Noun=_cap(noun), fields=sep.join(values))[:-1]
            parts.append(g.mention + ".")
    else:  # "Objects: large red circle - top left; two small blue squares - center and row 3, column 1."
        # (not parentheses: a pipeline reads "(...)" as A1111 emphasis markup and strips it)
        for g in gs:
            where = _bare_places(g)
            g.mention = _noun(g, rng) + (f" - {where}" if where else "")
        parts = [rng.choice(L.FIELD_OBJECTS).format("; ".join(g.mention for g in gs))]
    if bg is not None:
        noun = rng.choice(lex.bg_nouns)
        parts.insert(rng.choice((0, len(parts))), rng.choice(L.FIELD_BG).format(Noun=_cap(noun), bg=bg))
    return parts, " "


# --- held-out families (every fact stated: each needs a place for every object) -----------------


def _inversion(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    parts = []
    for g in gs:
        verb = _one_of(L.HELDOUT_INVERSION, g, rng)
        g.mention = f"{_cap(_places(g))} {verb} {_noun(g, rng)}"
        parts.append(g.mention + ".")
    if bg is not None:
        words = _bg(lex, bg, rng)
        frames = L.HELDOUT_INVERSION_BG + (words["bg_sentence"],)
        parts.insert(rng.choice((0, len(parts))), rng.choice(frames).format(**words))
    return parts, " "


def _imagine(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    words = _bg(lex, bg, rng)
    frame = rng.choice(L.HELDOUT_IMAGINE)
    if "{clauses}" in frame:
        for g in gs:
            g.mention = _one_of(L.CHAIN_CLAUSES, g, rng).format(np=_noun(g, rng), where=_places(g))
        return [frame.format(clauses=", ".join(g.mention for g in gs), **words)], " "
    return [frame.format(list=_join([_item(g, rng) for g in gs]), **words)], " "


def _passive(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    parts = []
    for g in gs:
        g.mention = _cap(_one_of(L.HELDOUT_PASSIVE, g, rng).format(_noun(g, rng), _places(g)))[:-1]
        parts.append(g.mention + ".")
    if bg is not None:
        words = _bg(lex, bg, rng)
        frames = L.HELDOUT_PASSIVE_BG + (words["bg_sentence"],)
        parts.insert(rng.choice((0, len(parts))), rng.choice(frames).format(**words))
    return parts, " "


def _subject(gs: list[_Group], bg: str | None, lex: Lexicon, rng: random.Random) -> tuple[list[str], str]:
    parts = []
    for g in gs:
        g.mention = _one_of(L.HELDOUT_SUBJECT, g, rng).format(_places(g), _noun(g, rng))[:-1]
        parts.append(g.mention + ".")
    if bg is not None:
        parts.insert(rng.choice((0, len(parts))), _bg(lex, bg, rng)["bg_sentence"])
    return parts, " "


FAMILIES = {
    "list": _list,
    "objects": _objects,
    "relative": _relative,
    "imperative": _imperative,
    "chained": _chained,
    "tags": _tags,
    "fields": _fields,
    "inversion": _inversion,
    "imagine": _imagine,
    "passive": _passive,
    "subject": _subject,
}


# --- what to leave out ------------------------------------------------------------------------------


def _omissions(scene: Scene, rng: random.Random) -> Specified:
    """A record that leaves at least one fact out: sizes, counts, some or all places, the background."""
    no_places = rng.random() < 0.25  # sometimes no object gets a place ("a red circle and two squares")
    specs = []
    for g in scene.groups():
        u = rng.random()
        if no_places or 0.45 <= u < 0.8:
            cells = (False,) * g.count
        elif u < 0.45:
            cells = (True,) * g.count
        else:  # some members placed, the others open
            cells = tuple(rng.random() < 0.5 for _ in g.cells)
        count = g.count == 1 or rng.random() >= 0.3
        specs.append(GroupSpec(g.shape, size=rng.random() >= 0.4, count=count, cells=cells))
    background = rng.random() >= 0.5
    if background and all(s.full for s in specs):  # nothing left out yet: leave out one fact at random
        facts: list[tuple[str, int, int]] = [("background", -1, -1)]
        for i, s in enumerate(specs):
            facts += [("size", i, -1)] + [("cell", i, j) for j in range(len(s.cells))]
            facts += [("count", i, -1)] if len(s.cells) > 1 else []
        what, i, j = rng.choice(facts)
        if what == "background":
            background = False
        else:
            s = specs[i]
            cells = tuple(c and k != j for k, c in enumerate(s.cells))
            specs[i] = GroupSpec(s.shape, s.size and what != "size", s.count and what != "count", cells)
    return Specified(background, tuple(specs))


def _true_relations(groups: list[Group]) -> list[tuple[str, str, str]]:
    """Every true (a, relation, b) between two single objects, in both orientations."""
    singles = [g for g in groups if g.count == 1]
    out = []
    for a in singles:
        for b in singles:
            (ra, ca), (rb, cb) = a.cells[0], b.cells[0]
            if ca != cb:
                out.append((a.shape, "left of" if ca < cb else "right of", b.shape))
            if ra != rb:
                out.append((a.shape, "above" if ra < rb else "below", b.shape))
    return out


# --- composing a caption ------------------------------------------------------------------------------


def _compose(scene: Scene, rng: random.Random, spec: Specified, families: tuple[str, ...], lex: Lexicon) -> Caption:
    """One caption of ``scene`` stating what ``spec`` says, in one of ``families`` with ``lex``'s words.

    Relations and the total are extras: added only while the caption stays within ``MAX_TOKENS``.
    """
    groups = scene.groups()
    order = list(range(len(groups)))
    rng.shuffle(order)
    gs = []
    for k in order:
        g, s = groups[k], spec.groups[k]
        if g.count == 1:
            count = rng.choice(L.SINGLE_ARTICLES)
        else:
            count = rng.choice(L.COUNT_WORDS[g.count]) if s.count else rng.choice(L.VAGUE_PLURALS)
        places = [lex.place(cell, rng) for cell, stated in zip(g.cells, s.cells) if stated]
        rng.shuffle(places)
        size = rng.choice(lex.sizes[g.size]) if s.size else ""
        gs.append(_Group(g, s, size, count, places))
    family = rng.choice(families)
    if family in HELDOUT_FAMILIES and not spec.full:
        raise EllaError(f"the held-out family {family!r} states every fact; it has no under-specified form")
    parts, sep = FAMILIES[family](gs, scene.background if spec.background else None, lex, rng)
    tags, heldout = sep != " ", family in HELDOUT_FAMILIES
    room = MAX_TOKENS - estimate_tokens(sep.join(parts))

    def cost(text: str) -> int:  # its tokens, less [CLS]/[SEP], plus one for the separator
        return estimate_tokens(text) - 1

    stated: list[tuple[str, str, str]] = []
    candidates = _true_relations(groups)
    n_relations = min(len(candidates), rng.choice((1, 2))) if rng.random() < RELATION_RATE else 0
    for a, relation, b in rng.sample(candidates, n_relations):
        if any({a, b} == {x, y} for x, _, y in stated):
            continue  # one relation per pair
        frames = L.REL_TAGS if tags else L.HELDOUT_REL_SENTENCES if heldout else L.REL_SENTENCES
        text = rng.choice(frames).format(a=a, r=rng.choice(lex.relations[relation]), b=b)
        if cost(text) <= room:
            parts.insert(rng.randrange(1, len(parts) + 1), text)
            room -= cost(text)
            stated.append((a, relation, b))
    n = len(scene.objects)
    if n > 1 and rng.random() < TOTAL_RATE:
        number = rng.choice((L.TOTALS[n], str(n)))
        frames = L.TOTAL_TAGS if tags else L.HELDOUT_TOTALS if heldout else L.TOTAL_SENTENCES
        text = rng.choice(frames).format(n=number, N=_cap(number))
        if cost(text) <= room:
            parts.append(text)
    record = Specified(spec.background, spec.groups, tuple(stated))
    text = sep.join(parts)
    # a mention that opens a sentence was capitalised there
    mentions = {g.group.shape: g.mention if g.mention in text else _cap(g.mention) for g in gs}
    return Caption(text, record, family, lex.name, tuple(mentions[g.shape] for g in groups))


def _within_budget(
    scene: Scene, rng: random.Random, spec: Specified, families: tuple[str, ...], lex: Lexicon
) -> Caption:
    """The first of a few wordings of ``spec`` that fits ``MAX_TOKENS`` (long families on 5-object scenes may not)."""
    for _ in range(8):
        out = _compose(scene, rng, spec, families, lex)
        if estimate_tokens(out.text) <= MAX_TOKENS:
            return out
    return out  # scenes beyond five objects may not fit at all; the last draw is as good as any


def describe(scene: Scene, rng: random.Random, underspecified: float = UNDERSPECIFIED_RATE) -> Caption:
    """A training caption of ``scene`` with its record: training language, some facts left out at a rate."""
    if not 0 <= underspecified <= 1:
        raise EllaError(f"underspecified={underspecified}: a rate of captions, between 0 and 1")
    spec = _omissions(scene, rng) if rng.random() < underspecified else Specified.everything(scene)
    return _within_budget(scene, rng, spec, TRAIN_FAMILIES, TRAIN)


def caption(scene: Scene, rng: random.Random) -> str:
    """A training caption of ``scene``; wording, order and omissions drawn from ``rng``."""
    return describe(scene, rng).text


def eval_prompt(scene: Scene, rng: random.Random, kind: str = "train") -> Caption:
    """A prompt of ``kind`` (one of ``KINDS``) for ``scene``, with the record of what it states."""
    if kind not in KINDS:
        raise EllaError(f"unknown prompt kind {kind!r}; use one of {', '.join(KINDS)}")
    families = {"terse": ("tags",), "heldout": HELDOUT_FAMILIES, "heldout_families": HELDOUT_FAMILIES}
    lex = HELDOUT if kind in ("heldout", "heldout_phrases") else TRAIN
    spec = _omissions(scene, rng) if kind == "underspecified" else Specified.everything(scene)
    return _within_budget(scene, rng, spec, families.get(kind, TRAIN_FAMILIES), lex)


def caption_for(seed: int, index: int, n_objects: int | None = None) -> str:
    """The training caption of ``scene_for(seed, index, n_objects)``, with its own reproducible wording."""
    return caption(scene_for(seed, index, n_objects), derived_rng(seed, index, "caption"))


def captions_for(seed: int, index: int, k: int, n_objects: int | None = None) -> list[str]:
    """``k`` different training captions of one scene, reproducibly; the first is ``caption_for``'s.

    For training with several wordings per image: caption ``j`` has its own RNG, so the list for a
    larger ``k`` extends the one for a smaller ``k``. A draw that repeats an earlier caption is skipped.
    """
    if k < 1:
        raise EllaError(f"k={k}: ask for at least one caption")
    scene = scene_for(seed, index, n_objects)
    out: list[str] = []
    j = 0
    while len(out) < k:
        rng = derived_rng(seed, index, "caption" if j == 0 else f"caption/{j}")
        text = caption(scene, rng)
        if text not in out:
            out.append(text)
        j += 1
        if j > 50 * k:  # a one-object scene still has hundreds of wordings; this only guards a bug
            raise EllaError(f"found only {len(out)} different captions of scene {index} in {j} draws")
    return out


def prompt_for(seed: int, index: int, kind: str = "train", n_objects: int | None = None) -> Caption:
    """The ``kind`` prompt of ``scene_for(seed, index, n_objects)``: the same scenes for every kind, so
    scores of kinds compare like for like; the same (seed, index, kind) always gives the same prompt."""
    return eval_prompt(scene_for(seed, index, n_objects), derived_rng(seed, index, f"prompt/{kind}"), kind)
