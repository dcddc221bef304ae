"""Grounded question/answer dialogs about synthetic MME images: the built-in model's training text.

Every synthetic question gets two kinds of answer, as real Qwen-VL models give them:

* MME style: the question ends " Please answer yes or no." and the answer is the bare word
  ("Yes" / "No"), so MME's logit and generate scoring read it as they read a real model's.
* Reasoning style: the question ends `REASON_SUFFIX` and the answer first states what the image
  shows about the objects the question names, then the verdict:
  "The red circle is on the left and the blue square is on the right.\\n\\nSo the answer is yes."
  These are the responses whose tokens `anchors` and the weight methods score: the grounded words
  (colour, shape, position, number) can only be right by looking at the image, the template words
  ("The", "is", "So the answer") cannot.

* Description: `DESCRIBE_PROMPT` -> "There are two shapes: a red circle at the top left and a
  blue square at the bottom right." (shapes left to right, each with its image quadrant). Every
  content word of it needs the image; it is the dense supervision that makes the vision tower
  learn features at all (question-only styles leave most answer tokens copyable from the text).

Only the shape categories (existence, count, position, color) are covered: the built-in model
has no capacity to read rendered text, and its OCR / arithmetic answers would be guesses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from vlmcredit.data.mme_synth import (
    COLORS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    SHAPES,
    SUFFIX,
    SynthItem,
    SynthShape,
    render_shapes,
)

DIALOG_CATEGORIES = ("existence", "count", "position", "color")
# training-only category: "Is there a red shape in this image?" (`render_presence`). It asks for a
# colour the way existence asks for a kind; synthetic MME's colour questions never name a drawn
# colour in their No question, so the same presence check answers them
PRESENCE = "color_presence"
TRAIN_CATEGORIES = (*DIALOG_CATEGORIES, PRESENCE)
REASON_SUFFIX = " Look at the image, then answer yes or no."
LOOKUP_SUFFIX = " Name what you see, then answer yes or no."
DESCRIBE_PROMPT = "Describe the shapes in the image."
STYLES = ("mme", "reason", "describe")
# training-only style: the first answer word is the fact the verdict needs (`lookup_fact`).
# With `lookup_copyable=False` (dialogs) colour and count ask it on the No question only: in the
# Yes one the fact is a word of the question, and copying it from there is right half the time
# without reading the image (a run with both learned exactly that: the asked colour on every
# question). Position keeps both: its No fact is the opposite of the asked word, which the text
# alone would give.
ONE_OF_MANY = ("color", "count")
TRAIN_STYLES = (*STYLES, "lookup")


@dataclass(frozen=True)
class Dialog:
    """One user question about an image and the answer the built-in model is taught."""

    category: str
    question: str  # the full user text, suffix included
    answer: str  # the full assistant text
    truth: str  # "Yes" / "No"
    style: str  # "mme" or "reason"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _plural(kind: str, n: int) -> str:
    if n == 1:
        return f"one {kind}"
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {kind}s"


def _where(shape: SynthShape, other: SynthShape) -> str:
    """The half of the image `shape` lies in, along the axis that separates it from `other`."""
    if abs(shape.cx - other.cx) >= abs(shape.cy - other.cy):
        return "on the left" if shape.cx < other.cx else "on the right"
    return "at the top" if shape.cy < other.cy else "at the bottom"


def _asked_color(question: str) -> str:
    return next(c for c in COLORS if f" {c} " in question)


def render_presence(rng: random.Random, name: str) -> SynthItem:
    """1-3 shapes and the colour-presence pair: a drawn colour (Yes) and an undrawn one (No)."""
    item = render_shapes(rng, rng.randint(1, 3), name, PRESENCE)
    drawn = [c for c in COLORS if any(s.color == c for s in item.shapes)]
    yes = rng.choice(drawn)
    no = rng.choice([c for c in COLORS if c not in drawn])
    ask = "Is there {} shape in this image?" + SUFFIX
    return replace(item, questions=((ask.format(_a(yes)), "Yes"), (ask.format(_a(no)), "No")))


def grounded_statement(item: SynthItem, question: str) -> str:
    """What the image shows about the objects `question` names (one sentence, no verdict)."""
    shapes = item.shapes
    if item.category == PRESENCE:
        color = _asked_color(question)
        found = [s for s in shapes if s.color == color]
        if found:
            return f"There is {_a(color)} {found[0].kind}."
        present = shapes[0]
        return f"There is no {color} shape, only {_a(present.color)} {present.kind}."
    if item.category == "existence":
        asked = next(k for k in ("circle", "square", "triangle") if f" {k} " in question)
        found = [s for s in shapes if s.kind == asked]
        if found:
            return f"There is {_a(found[0].color)} {asked}."
        present = shapes[0]
        return f"There is no {asked}, only {_a(present.color)} {present.kind}."
    if item.category == "count":
        kind = next(k for k in ("circle", "square", "triangle") if k in question)
        n = sum(s.kind == kind for s in shapes)
        return f"There {'is' if n == 1 else 'are'} {_plural(kind, n)}."
    if item.category == "position":
        a, b = shapes
        return (
            f"The {a.color} {a.kind} is {_where(a, b)} and the {b.color} {b.kind} is "
            f"{_where(b, a)}."
        )
    if item.category == "color":
        target = shapes[0]
        return f"The {target.kind} is {target.color}."
    raise ValueError(f"no grounded dialog for category {item.category!r}")


def lookup_fact(item: SynthItem, question: str) -> str:
    """The one word of the image that decides `question`: how many of the asked kind there are
    (existence, count) or of the asked colour (color_presence), the colour of the asked shape
    (color), or where the first named shape is relative to the second along the asked axis
    (position)."""
    shapes = item.shapes
    if item.category in ("existence", "count"):
        kind = next(k for k in SHAPES if f" {k}" in question)
        return NUMBER_WORDS[sum(s.kind == kind for s in shapes)]
    if item.category == PRESENCE:
        return NUMBER_WORDS[sum(s.color == _asked_color(question) for s in shapes)]
    if item.category == "color":
        return shapes[0].color
    if item.category == "position":
        a, b = shapes
        if "left" in question or "right" in question:
            return "left" if a.cx < b.cx else "right"
        return "above" if a.cy < b.cy else "below"
    raise ValueError(f"no lookup dialog for category {item.category!r}")


def named_shapes(item: SynthItem, question: str) -> list[SynthShape]:
    """The drawn shapes `question` is about (its kind, or both shapes of a position question)."""
    if item.category == "position":
        return list(item.shapes)
    if item.category == "color":
        return [item.shapes[0]]
    if item.category == PRESENCE:
        color = _asked_color(question)
        return [s for s in item.shapes if s.color == color] or list(item.shapes)
    kinds = [k for k in ("circle", "square", "triangle") if k in question]
    named = [s for s in item.shapes if s.kind in kinds]
    return named or list(item.shapes)  # "is there a triangle?" with none: every drawn shape


def quadrant(shape: SynthShape, width: int = IMAGE_SIZE[0], height: int = IMAGE_SIZE[1]) -> str:
    vertical = "top" if shape.cy < height / 2 else "bottom"
    return f"{vertical} {'left' if shape.cx < width / 2 else 'right'}"


def description(item: SynthItem) -> str:
    """Every drawn shape, left to right, with its colour and image quadrant."""
    shapes = sorted(item.shapes, key=lambda s: (s.cx, s.cy))
    parts = [f"{_a(s.color)} {s.kind} at the {quadrant(s)}" for s in shapes]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if len(parts) == 1:
        return f"There is one shape: {listing}."
    return f"There are {NUMBER_WORDS[len(parts)]} shapes: {listing}."


def dialogs(
    item: SynthItem, styles: Sequence[str] = STYLES, lookup_copyable: bool = True
) -> list[Dialog]:
    """Both questions of `item` in every question style of `styles`, plus its description
    when "describe" is among them (lookup: see `ONE_OF_MANY`)."""
    out = []
    if "describe" in styles:
        out.append(Dialog(item.category, DESCRIBE_PROMPT, description(item), "", "describe"))
    for question, truth in item.questions:
        base = question.removesuffix(SUFFIX)
        for style in styles:
            if style == "mme":
                out.append(Dialog(item.category, question, truth, truth, style))
            elif style == "reason":
                statement = grounded_statement(item, base)
                answer = f"{statement}\n\nSo the answer is {truth.lower()}."
                out.append(Dialog(item.category, base + REASON_SUFFIX, answer, truth, style))
            elif style == "lookup" and (
                lookup_copyable or truth == "No" or item.category not in ONE_OF_MANY
            ):
                answer = f"{lookup_fact(item, base)}, so {truth.lower()}."
                out.append(Dialog(item.category, base + LOOKUP_SUFFIX, answer, truth, style))
    return out


def single_shape_question(item: SynthItem, rng: random.Random) -> Dialog:
    """A bare yes/no question about the one shape of a `render_shapes(rng, 1, ...)` image, worded
    as MME's existence or colour question (Yes and No equally likely).

    With one object, the answer needs no search for the named object: the model learns to compare
    what it reads with what is asked before it must find one object among several.
    """
    (shape,) = item.shapes
    truth = rng.choice(("Yes", "No"))
    if rng.random() < 0.5:
        kind = shape.kind if truth == "Yes" else rng.choice([k for k in SHAPES if k != shape.kind])
        question, category = f"Is there {_a(kind)} in this image?", "existence"
    else:
        others = [c for c in COLORS if c != shape.color]
        color = shape.color if truth == "Yes" else rng.choice(others)
        question, category = f"Is the {shape.kind} in this image {color}?", "color"
    return Dialog(category, question + SUFFIX, truth, truth, "mme")
