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

Only the shape categories (existence, count, position, color) are covered: the built-in model
has no capacity to read rendered text, and its OCR / arithmetic answers would be guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmcredit.data.mme_synth import NUMBER_WORDS, SUFFIX, SynthItem, SynthShape

DIALOG_CATEGORIES = ("existence", "count", "position", "color")
REASON_SUFFIX = " Look at the image, then answer yes or no."
STYLES = ("mme", "reason")


@dataclass(frozen=True)
class Dialog:
    """One user question about an image and the answer the built-in model is taught."""

    category: str
    question: str  # the full user text, suffix included
    answer: str  # the full assistant text
    truth: str  # "Yes" / "No"
    style: str  # "mme" or "reason"


def _plural(kind: str, n: int) -> str:
    if n == 1:
        return f"one {kind}"
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {kind}s"


def _where(shape: SynthShape, other: SynthShape) -> str:
    """The half of the image `shape` lies in, along the axis that separates it from `other`."""
    if abs(shape.cx - other.cx) >= abs(shape.cy - other.cy):
        return "on the left" if shape.cx < other.cx else "on the right"
    return "at the top" if shape.cy < other.cy else "at the bottom"


def grounded_statement(item: SynthItem, question: str) -> str:
    """What the image shows about the objects `question` names (one sentence, no verdict)."""
    shapes = item.shapes
    if item.category == "existence":
        asked = next(k for k in ("circle", "square", "triangle") if f" {k} " in question)
        found = [s for s in shapes if s.kind == asked]
        if found:
            return f"There is a {found[0].color} {asked}."
        present = shapes[0]
        return f"There is no {asked}, only a {present.color} {present.kind}."
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


def named_shapes(item: SynthItem, question: str) -> list[SynthShape]:
    """The drawn shapes `question` is about (its kind, or both shapes of a position question)."""
    if item.category == "position":
        return list(item.shapes)
    if item.category == "color":
        return [item.shapes[0]]
    kinds = [k for k in ("circle", "square", "triangle") if k in question]
    named = [s for s in item.shapes if s.kind in kinds]
    return named or list(item.shapes)  # "is there a triangle?" with none: every drawn shape


def dialogs(item: SynthItem, styles: Sequence[str] = STYLES) -> list[Dialog]:
    """Both questions of `item` in every style of `styles`."""
    out = []
    for question, truth in item.questions:
        base = question.removesuffix(SUFFIX)
        for style in styles:
            if style == "mme":
                out.append(Dialog(item.category, question, truth, truth, style))
            else:
                statement = grounded_statement(item, base)
                answer = f"{statement}\n\nSo the answer is {truth.lower()}."
                out.append(Dialog(item.category, base + REASON_SUFFIX, answer, truth, style))
    return out
