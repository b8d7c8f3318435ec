"""Dense captions of shapes scenes: every fact stated, in varied words and order.

Why varied: the connector should learn the *meaning* of a prompt, not one template's word
positions — so each fact (background, each group's count, colour, size, shape and cells, and one
or two relations between objects) has several phrasings, and mentions come in random order. Why
dense: with 3-5 objects a caption runs to ~30-90 words, long relative to CLIP's 77 tokens, which
is the regime where ELLA's LLM features are meant to beat CLIP (as in DPG-Bench).
All randomness comes from the ``rng`` argument; the facts come from the scene alone.
"""

from __future__ import annotations

import random

from .world import COLS, PLURALS, Group, Scene, derived_rng, scene_for, scene_relations

NUMBERS = {1: "one", 2: "two", 3: "three"}
TOTALS = dict(enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "higher up than", "over"),
    "below": ("below", "beneath", "lower down than", "under"),
}


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def join(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c" — or "a; b; and c" when an item has commas of its own."""
    if len(items) == 1:
        return items[0]
    if any("," in item for item in items):
        return "; ".join(items[:-1]) + "; and " + items[-1]
    return ", ".join(items[:-1]) + " and " + items[-1]


def where(cell: tuple[int, int], rng: random.Random) -> str:
    """A prepositional phrase for a grid cell ("in the top left corner", "at the upper left" …)."""
    row, col = cell
    if (row, col) == (1, 1):
        return rng.choice(("in the center", "in the middle of the image", "right in the middle", "at the very center"))
    if row != 1 and col != 1:
        vertical = rng.choice((("top", "upper"), ("bottom", "lower"))[row // 2])
        side = COLS[col]
        return rng.choice(
            (f"in the {vertical} {side} corner", f"at the {vertical} {side}", f"in the {vertical}-{side} corner")
        )
    if row == 1:
        side = COLS[col]
        return rng.choice(
            (
                f"at the middle {side}",
                f"in the middle of the {side} side",
                f"at the center {side}",
                f"halfway down the {side} side",
            )
        )
    edge = ("top", "bottom")[row // 2]
    return rng.choice(
        (
            f"at the {edge} center",
            f"in the middle of the {edge} edge",
            f"at the center of the {edge} edge",
            f"in the {edge} middle",
        )
    )


def noun_phrase(group: Group, rng: random.Random) -> str:
    """Count, size, colour and shape: "a big red circle", "two small squares coloured blue" …"""
    size, colour = rng.choice(SIZE_WORDS[group.size]), group.colour
    if group.count == 1:
        shape = group.shape
        return rng.choice(
            (
                f"{article(size)} {colour} {shape}",
                f"one {size} {colour} {shape}",
                f"{article(size)} {shape} coloured {colour}",
                f"{article(size)} {shape} in {colour}",
                f"{article(colour)} {shape}, {size},",
            )
        )
    number, shapes = NUMBERS[group.count], PLURALS[group.shape]
    return rng.choice(
        (
            f"{number} {size} {colour} {shapes}",
            f"{number} {size} {shapes} coloured {colour}",
            f"{number} {colour} {shapes}, both {size},"
            if group.count == 2
            else f"{number} {colour} {shapes}, all {size},",
            f"{number} identical {size} {colour} {shapes}",
        )
    )


def group_phrase(group: Group, rng: random.Random) -> str:
    """The noun phrase and its place(s): "two red squares, one at the top left and one in the center"."""
    cells = list(group.cells)
    rng.shuffle(cells)
    noun = noun_phrase(group, rng)
    if group.count == 1:
        return f"{noun} {where(cells[0], rng)}"
    places = [where(c, rng) for c in cells]
    if rng.random() < 0.5:
        return f"{noun.rstrip(',')}, " + join([f"one {p}" for p in places])
    return f"{noun} placed {join(places)}"


def relation_sentence(a: str, relation: str, b: str, rng: random.Random) -> str:
    words = rng.choice(RELATION_WORDS[relation])
    return rng.choice(
        (
            f"The {a} is {words} the {b}.",
            f"The {a} appears {words} the {b}.",
            f"Note that the {a} is {words} the {b}.",
            f"{cap(words)} the {b} is the {a}.",
        )
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """A dense caption of ``scene`` stating every fact; wording and order drawn from ``rng``."""
    groups = scene.groups()
    rng.shuffle(groups)
    phrases = [group_phrase(g, rng) for g in groups]
    bg = scene.background
    style = rng.randrange(3)
    if style == 0:  # one list sentence with the background up front
        frame = rng.choice(
            (
                f"A {bg} background with {{}}.",
                f"An image on a plain {bg} background showing {{}}.",
                f"On a {bg} background we see {{}}.",
            )
        )
        text = [frame.format(join(phrases))]
    elif style == 1:  # the list first, the background after
        text = [
            cap(join(phrases))
            + rng.choice((f", all on a {bg} background.", f", on a {bg} backdrop.", f". The background is {bg}."))
        ]
    else:  # one sentence per group
        text = []
        for g, p in zip(groups, phrases):
            plural = g.count > 1
            frame = rng.choice(
                (
                    "There are {}." if plural else "There is {}.",
                    "We can see {}.",
                    "The picture shows {}.",
                    "{} can be seen." if plural else "{} is visible.",
                )
            )
            text.append(frame.format(p) if not frame.startswith("{") else cap(frame.format(p)))
        text.insert(
            rng.randrange(len(text) + 1),
            rng.choice(
                (f"The background is {bg}.", f"The backdrop is {bg}.", f"Everything sits on a {bg} background.")
            ),
        )
    relations = scene_relations(scene)
    text += [relation_sentence(a, r, b, rng) for a, r, b in relations]
    n = len(scene.objects)
    if n > 1 and (not relations or rng.random() < 0.3):  # the total: one more fact, where few relations are
        total = TOTALS[n]
        text.append(
            rng.choice(
                (
                    f"There are {total} objects in total.",
                    f"Altogether the picture holds {total} shapes.",
                    f"{cap(total)} shapes in all.",
                    f"That makes {total} objects.",
                )
            )
        )
    return " ".join(text)


def caption_for(seed: int, index: int, n_objects: int | None = None) -> str:
    """The caption of ``scene_for(seed, index, n_objects)``, with its own reproducible wording."""
    return caption(scene_for(seed, index, n_objects), derived_rng(seed, index, "caption"))
