"""A1111 prompt syntax: emphasis weights and prompt editing over sampling steps.

Prompts written for AUTOMATIC1111's stable-diffusion-webui are shared everywhere, so they should mean here what
they mean there. The webui has two layers of markup, and so does this module:

* **prompt editing** picks, per sampling step, which text is active: ``[from:to:when]``, ``[to:when]``,
  ``[from::when]`` and alternation ``[a|b]`` (current webui scheduling: a ``when`` with a ``.`` is a fraction of
  the steps, any other is a step number);
* **emphasis** turns one such text into weighted segments: ``(text)`` x1.1, ``[text]`` /1.1, ``(text:1.3)``, and
  the ``BREAK`` keyword.

Editing is resolved first, as in the webui, because the two overlap: ``[cat]`` is emphasis but ``[cat:dog:5]`` is
editing, and an edit may sit inside emphasis, ``(a [red:blue:0.5] car:1.2)``, where the weight must apply to
whichever colour is active. Resolving editing first leaves plain emphasis texts; there are few distinct ones
(:func:`prompt_variants`), so each can be parsed and encoded once rather than once per step.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from .errors import EllaError

BREAK = "BREAK"  # A1111's keyword that ends a 75-token chunk early
MAX_VARIANTS = 64  # distinct texts one prompt may schedule; each costs an LLM encoding

Segment = tuple[str, float | None]

_ROUND, _SQUARE = 1.1, 1 / 1.1  # the webui's multipliers for ( ) and [ ]
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_WHEN = re.compile(rf"\s*{_NUMBER}\s*")
_PLAIN = re.compile(r"[^\\()\[\]:|]+")  # a run of text with no editing syntax in it
_EMPHASIS_TOKEN = re.compile(
    r"\\(?P<escaped>[()\[\]\\:])"
    rf"|:\s*(?P<weight>{_NUMBER})\s*\)"
    rf"|(?P<brk>(?<!\S){BREAK}(?!\S))"
    r"|[^\\()\[\]:\s]+|\s+|.",  # words and spaces apart, so that BREAK is tried at the start of every word
    re.S,
)


# ---------------------------------------------------------------------------------------------------------- emphasis
def parse_weights(prompt: str) -> list[Segment]:
    """Split A1111 emphasis markup into ``(text, weight)`` segments; ``BREAK`` is the segment ``("BREAK", None)``.

    Follows the webui's ``parse_prompt_attention``: nested brackets multiply, ``(text:w)`` multiplies by ``w``, an
    unclosed ``(`` or ``[`` weights the rest of the prompt, and ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` ``\\:`` are
    literal. Two deliberate differences: a stray closing bracket is dropped rather than kept as text, and ``BREAK``
    keeps its surrounding spaces (in the neighbouring segments) so that :func:`plain_text` still reads as a sentence.
    Weights are exact products (``((a))`` is ``1.1 * 1.1``), so ``(a:1)`` merges with its unweighted neighbours.
    """
    pieces: list[list] = []  # [text, weight]; weight None marks a BREAK, which no bracket scales
    rounds: list[int] = []  # where each open "(" began, as an index in pieces; squares likewise for "["
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(prompt):
        token = match.group()
        if match["escaped"] is not None:
            pieces.append([match["escaped"], 1.0])
        elif match["weight"] is not None:
            if rounds:  # the webui closes the innermost "(" even when a "[" opened after it
                scale(rounds.pop(), float(match["weight"]))
            else:  # no "(" to close: ":number" is text and ")" a stray closer
                pieces.append([token[:-1], 1.0])
        elif match["brk"] is not None:
            pieces.append([BREAK, None])
        elif token in ("(", "["):
            (rounds if token == "(" else squares).append(len(pieces))
        elif token in (")", "]"):
            stack = rounds if token == ")" else squares
            if stack:
                scale(stack.pop(), _ROUND if token == ")" else _SQUARE)
        else:
            pieces.append([token, 1.0])
    for start in reversed(rounds):
        scale(start, _ROUND)
    for start in reversed(squares):
        scale(start, _SQUARE)

    segments: list[Segment] = []
    for text, weight in pieces:
        if weight is None:
            segments.append((BREAK, None))
        elif text and segments and segments[-1][1] == weight:
            segments[-1] = (segments[-1][0] + text, weight)
        elif text:
            segments.append((text, weight))
    return segments


def plain_text(segments: list[Segment]) -> str:
    """The prompt as the LLM should read it: markup gone, ``BREAK`` dropped (a chunk break means nothing to it)."""
    return "".join(text for text, weight in segments if weight is not None)


def weight_spans(segments: list[Segment]) -> list[tuple[int, int, float]]:
    """``(start, end, weight)`` character spans of :func:`plain_text` (end exclusive) whose weight is not 1.

    Character spans, not tokens: the tokenizer that will map them onto tokens is not known here.
    """
    spans, offset = [], 0
    for text, weight in segments:
        if weight is not None:
            if weight != 1.0:
                spans.append((offset, offset + len(text), weight))
            offset += len(text)
    return spans


def literal(text: str) -> str:
    """``text`` escaped so that neither emphasis nor editing reads anything into it: a benchmark's natural
    sentence "a School Resource Officer (SRO)" must reach the LLM with its parentheses, unweighted."""
    return re.sub(r"([\\()\[\]])", r"\\\1", text)


class PromptWeightsWarning(UserWarning):
    """A1111-style emphasis was removed from a prompt (``prompt_weights=False``): its words were read unweighted."""


# The markup as the stripping below sees it: (text:1.3), and the bare brackets of (text) / [text]; \( \) \[ \]
# are literal.
_WEIGHTED = re.compile(r"(?<!\\)\(([^()]*?):\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?<!\\)\)")
_BRACKET = re.compile(r"(?<!\\)[()\[\]]")


def strip_prompt_weights(prompt: str) -> str:
    """``"a (red:1.3) car, ((sharp))"`` -> ``"a red car, sharp"``; escaped brackets become literal.

    What ELLA pipelines did before they read weights, kept as ``prompt_weights=False``: the markup removed
    (with a :class:`PromptWeightsWarning`) so that the LLM does not read it as text, and nothing weighted.
    Unlike :func:`parse_weights` it leaves ``BREAK`` in the text, as it always did.
    """
    text = prompt
    while True:  # innermost first: ((a:1.2) b:1.1)
        new = _WEIGHTED.sub(r"\1", text)
        if new == text:
            break
        text = new
    text = _BRACKET.sub("", text)
    return re.sub(r"\\([()\[\]])", r"\1", text)


def has_weights(prompt: str) -> bool:
    """Whether emphasis changes anything: a lone ``BREAK`` or ``(a:1)`` does not."""
    return any(weight is not None and weight != 1.0 for _, weight in parse_weights(prompt))


# ------------------------------------------------------------------------------------------------------------ editing
@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``when`` is kept as written, since a ``.`` in it changes its meaning."""

    before: list
    after: list
    when: str

    def last_before_step(self, steps: int) -> int:
        # The webui clamps this to `steps`; that changes nothing here since no step exceeds `steps`.
        if "." in self.when:
            return int(float(self.when) * steps)
        return int(self.when)

    def reachable(self) -> list[list]:
        """The branches some step count shows: ``before`` needs a boundary >= 1, ``after`` one below ``steps``."""
        value, fraction = float(self.when), "." in self.when
        shows_before = value > 0 if fraction else int(value) >= 1
        shows_after = value < 1 if fraction else True  # an integer step is passed once steps exceed it
        return [branch for branch, shown in ((self.before, shows_before), (self.after, shows_after)) if shown]


@dataclass(frozen=True)
class _Alternation:
    options: list[list]  # [a|b|c]: one option per step, in turn


class _EditingParser:
    """Recursive descent over the editing syntax; anything that is not editing stays text, byte for byte.

    A parsed prompt is a list of nodes: ``str``, :class:`_Edit` or :class:`_Alternation`. Brackets that turn out
    not to be editing (emphasis ``[a]``, ``[a:b]``, an unclosed ``[``) are flattened back into text around their
    parsed contents, so rendering a prompt without editing gives the prompt itself.
    """

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def sequence(self, stops: str = "") -> list:
        nodes: list = []
        parens = 0  # "(" open in this sequence: a ":" or "|" inside one is emphasis, not a bracket separator
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in stops and (char == "]" or not parens):
                break
            if char == "[":
                self.pos += 1
                nodes += self.bracket()
                continue
            if char == "\\":  # an escape stays as written, for parse_weights to read
                piece = self.text[self.pos : self.pos + 2]
            elif plain := _PLAIN.match(self.text, self.pos):
                piece = plain.group()
            else:
                piece = char
                if char == "(":
                    parens += 1
                elif char == ")" and parens:
                    parens -= 1
            nodes.append(piece)
            self.pos += len(piece)
        return nodes

    def bracket(self) -> list:
        parts, separators = [self.sequence("]:|")], []
        while self.pos < len(self.text) and self.text[self.pos] != "]":
            separators.append(self.text[self.pos])
            self.pos += 1
            parts.append(self.sequence("]:|"))
        closed = self.pos < len(self.text)
        if closed:
            self.pos += 1
            if set(separators) == {"|"}:
                return [_Alternation(parts)]
            when = "".join(node if isinstance(node, str) else "[" for node in parts[-1])  # "[": never a number
            if set(separators) == {":"} and len(parts) <= 3 and _WHEN.fullmatch(when):
                return [_Edit(parts[0] if len(parts) == 3 else [], parts[-2], when.strip())]
        nodes: list = ["["]
        for part, separator in zip(parts, separators + [""]):
            nodes += [*part, separator] if separator else part
        return nodes + ["]"] if closed else nodes


def _parse_editing(prompt: str) -> list:
    try:
        return _EditingParser(prompt).sequence()
    except RecursionError:
        raise EllaError("the prompt nests [ ] brackets too deeply; expected a few hundred levels at most") from None


def _render(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Alternation):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(_render(node.before if step <= node.last_before_step(steps) else node.after, step, steps))
    return "".join(out)


def _variants(nodes: list) -> list[str]:
    texts = [""]
    for node in nodes:
        if isinstance(node, str):
            choices = [node]
        else:
            branches = node.options if isinstance(node, _Alternation) else node.reachable()
            choices = [text for branch in branches for text in _variants(branch)]
        # Every prefix extends to a distinct text, so the count never shrinks: stopping early is exact.
        texts = list(dict.fromkeys(text + choice for text in texts for choice in choices))
        if len(texts) > MAX_VARIANTS:
            raise EllaError(
                f"the prompt's editing syntax ([a:b:when], [a|b]) yields more than {MAX_VARIANTS} distinct texts; "
                "expected fewer alternations and edits"
            )
    return texts


def has_editing(prompt: str) -> bool:
    """Whether the text changes over the steps: ``[from:to:when]``, ``[to:when]``, ``[from::when]`` or ``[a|b]``."""
    return any(not isinstance(node, str) for node in _parse_editing(prompt))


def prompt_schedule(prompt: str, steps: int) -> list[str]:
    """The text active at each sampling step ``1..steps``, as the webui would condition on it.

    Step ``s`` shows ``from`` of ``[from:to:when]`` while ``s <= N``, where ``N = int(when * steps)`` for a
    fractional ``when`` and ``int(when)`` otherwise; ``[a|b|c]`` shows option ``(s - 1) % 3``. Emphasis markup
    is kept in the texts: it is parsed afterwards by :func:`parse_weights`, per distinct text.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise EllaError(f"prompt schedule steps was {steps!r}; expected a whole number >= 1")
    nodes = _parse_editing(prompt)
    return [_render(nodes, step, int(steps)) for step in range(1, int(steps) + 1)]


def prompt_variants(prompt: str) -> list[str]:
    """Every text :func:`prompt_schedule` can return for any step count, first-seen order; ``[prompt]`` if static.

    This is what must be encoded up front. It may hold a few texts no step count reaches (alternations with the
    same period run in lockstep, which is not modelled), never miss one.
    """
    return _variants(_parse_editing(prompt))
