"""Answer MME yes/no questions fast: next-token logits, encoded-once inputs, cached image features.

Head ablation scores MME once per configuration (1 + 28 times for a 7B model), so each
question is answered many times with the same image. Four things make that cheap:

* Logit answering: one forward per question; the answer is read off the full-vocabulary argmax
  at the answer position, as MME's official parser would read a decoded text starting with that
  token (`first_token_label`): a yes variant ("Yes", " yes", ...) -> "Yes", a no variant -> "No",
  a token whose own text already fixes the parse (4+ characters, e.g. "Nothing") -> its parse,
  anything else -> "other" (scored wrong). Whenever the first token decides the official label,
  this is exactly the label of decoding 16 tokens and parsing them; it differs only where a short
  non-variant first token ("N", "Y") leaves the label to later tokens, and then it says "other".
  `answer_generate` is the reference: greedy decoding of up to 16 tokens, parsed officially.
* Questions are encoded (chat template, processor, image-token expansion) once per run; each
  batch is assembled from the stored token ids, left-padded as `encode_samples` does.
* Image features come from a bounded cache keyed by a hash of the image's pixel values and grid,
  and reach the model through transformers' `mm_encoder_outputs` argument (also in
  `generate()`), so the vision tower runs once per image for the whole run: decoder-head
  ablation never touches it. Features are computed one image at a time, so they do not depend on
  which images share a batch, and cached logits equal uncached ones exactly.
* Every prompt starts with the same system prompt: its KV cache is computed once per
  configuration. The two questions of an image share their prompt up to the question text
  (image tokens, often the first words): that part runs once per image and only the
  questions' own ~20 tokens run per question (`probes.shared_prefix`). In layer-head mode the
  layers below the ablated one are skipped, from the inputs the first configuration of that
  layer recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmcredit.data.mme import MMEQuestion
from vlmcredit.data.mme_score import parse_answer
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import adapter_of
from vlmcredit.models.inputs import prompt_text
from vlmcredit.models.layout import build_mm_token_type_ids
from vlmcredit.probes.image_features import (
    ImageFeatureCache,
    ImageFeatures,
    compute_image_features,
    encoder_outputs,
    image_key,
    model_device,
)
from vlmcredit.probes.shared_prefix import (
    LayerInputStore,
    PrefixSession,
    pad_rows,
    shared_prefix_logits,
)

YES_VARIANTS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS = ("No", "no", "NO", " No", " no", " NO")
GENERATE_TOKENS = 16  # what lmms-eval's MME task decodes
ANSWERING_MODES = ("logits", "generate")
# The stored prediction of a logit answer that is neither yes nor no: the official parser reads
# it as "other" ("(oth" holds neither "yes" nor "no"), so `mme-score` scores it wrong as well.
OTHER_PREDICTION = "(other)"
PARSE_PREFIX = 4  # the official parser looks for yes/no in the first 4 characters


# -- yes / no tokens ----------------------------------------------------------------------------
@dataclass(frozen=True)
class YesNoTokens:
    """Single-token spellings of yes and no in one tokenizer."""

    yes: tuple[int, ...]
    no: tuple[int, ...]
    yes_text: tuple[str, ...] = ()
    no_text: tuple[str, ...] = ()
    # token id -> its text as `answer_generate` decodes it (special tokens dropped); without it
    # every non-variant first token reads as "other"
    decode: Callable[[int], str] | None = field(default=None, compare=False, repr=False)

    def first_token_label(self, token: int) -> str:
        """The official label of any decoded answer starting with `token`, or "other".

        A yes/no variant fixes the label whatever follows (`yes_no_tokens` keeps only such
        spellings). Any other token fixes it when its text has at least 4 characters, since the
        parser then sees only that text in its 4-character window and the text cannot equal
        "yes"/"no". A shorter token ("N", "", an end-of-turn token) leaves the label to later
        tokens: "other", the one answer a single logit cannot refute.
        """
        if token in self.yes:
            return "yes"
        if token in self.no:
            return "no"
        text = self.decode(token) if self.decode is not None else ""
        return parse_answer(text) if len(text) >= PARSE_PREFIX else "other"

    def decides(self, token: int) -> bool:
        """Whether `token` alone fixes the official label of an answer starting with it."""
        if token in self.yes or token in self.no:
            return True
        return self.decode is not None and len(self.decode(token)) >= PARSE_PREFIX


def yes_no_tokens(tokenizer: Any, source: str = "--ckpt") -> YesNoTokens:
    """The variants of YES_VARIANTS / NO_VARIANTS that are one token and decode back unchanged.

    Only spellings the official parser maps to yes/no whatever follows are candidates (no
    leading newline or double space), so a greedy first token among them fixes the parsed label.
    """
    found: dict[str, list[tuple[int, str]]] = {"yes": [], "no": []}
    for label, variants in (("yes", YES_VARIANTS), ("no", NO_VARIANTS)):
        for text in variants:
            ids = tokenizer.encode(text, add_special_tokens=False)
            single = len(ids) == 1 and tokenizer.decode(ids) == text
            if single and parse_answer(text) == label and ids[0] not in dict(found[label]):
                found[label].append((ids[0], text))
    for label in ("yes", "no"):
        if not found[label]:
            raise VlmCreditError(
                f"{source}: the tokenizer has no single-token '{label}' (tried "
                f"{', '.join(repr(v) for v in (YES_VARIANTS if label == 'yes' else NO_VARIANTS))});"
                " answer with --generate instead"
            )
    return YesNoTokens(
        tuple(i for i, _ in found["yes"]),
        tuple(i for i, _ in found["no"]),
        tuple(t for _, t in found["yes"]),
        tuple(t for _, t in found["no"]),
        decode=lambda token: tokenizer.decode([token], skip_special_tokens=True),
    )


# -- encoded questions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedQuestion:
    """A question's prompt token ids (image tokens expanded) and its image's key and grid."""

    ids: torch.Tensor  # (S,) int64
    image_key: str
    grid: tuple[int, int, int]


@dataclass
class MMEInputs:
    """MME questions encoded once, batched by length, with image features from `cache`.

    `prepare()` runs the processor on every question (and the vision tower on every image the
    cache has room for); `inputs(indices)` then assembles a left-padded batch without touching
    the processor, recomputing an image's features only when the cache could not hold them.
    """

    ck: Any  # LoadedCheckpoint
    questions: Sequence[MMEQuestion]
    cache: ImageFeatureCache
    encoded: list[EncodedQuestion] = field(default_factory=list)
    # applied to every loaded image before the processor (the gray-image control: `gray_image`)
    image_transform: Callable[[Any], Any] | None = None
    # layer-head shortcut: inputs of one decoder layer per batch (`probes.shared_prefix`)
    layer_store: LayerInputStore = field(default_factory=lambda: LayerInputStore(1 << 32))
    _system_length: int | None = field(default=None, repr=False)
    _positions: dict[tuple[int, int], tuple[torch.Tensor, int]] = field(
        default_factory=dict, repr=False
    )

    def load_image(self, index: int) -> Any:
        """Question `index`'s image as the model sees it (after `image_transform`)."""
        image = self.questions[index].load_image()
        return image if self.image_transform is None else self.image_transform(image)

    def prepare(self, on_question: Callable[[int], None] | None = None) -> None:
        """Encode every question; compute features of images while the cache has room."""
        processor = self.ck.processor
        self.encoded = []
        for index, q in enumerate(self.questions):
            image = self.load_image(index)
            text = prompt_text(processor, Sample([image], q.question))
            enc = processor(text=[text], images=[image], return_tensors="pt")
            grid = tuple(int(g) for g in enc["image_grid_thw"][0])
            key = image_key(enc["pixel_values"], grid)
            self.encoded.append(EncodedQuestion(enc["input_ids"][0].clone(), key, grid))  # type: ignore[arg-type]
            if key not in self.cache and self.cache.fits(self._feature_bytes(grid)):
                self.cache.put(key, self._compute(enc["pixel_values"], grid))
            if on_question:
                on_question(1)

    def batches(self, batch_size: int) -> list[list[int]]:
        """Question indices in batches: longest prompts first, an image's questions together.

        Sorting by length keeps padding (wasted compute) small when image sizes vary, as in
        MME; the longest batch comes first so an out-of-memory batch size fails at once.
        """
        by_image: dict[str, list[int]] = {}
        for i, q in enumerate(self.questions):
            by_image.setdefault(q.image_id, []).append(i)
        groups = sorted(
            by_image.values(), key=lambda g: (-max(self.encoded[i].ids.numel() for i in g), g[0])
        )
        order = [i for g in groups for i in g]
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    def features(self, index: int) -> ImageFeatures:
        """Features of question `index`'s image: from the cache, else recomputed (and offered)."""
        enc = self.encoded[index]
        cached = self.cache.get(enc.image_key)
        if cached is not None:
            return cached
        q = self.questions[index]
        out = self.ck.processor.image_processor(
            images=[self.load_image(index)], return_tensors="pt"
        )
        key = image_key(out["pixel_values"], enc.grid)
        if key != enc.image_key:  # the processor is deterministic; anything else is a bug
            raise RuntimeError(f"{q.image_id}: re-processed pixels differ from the first pass")
        features = self._compute(out["pixel_values"], enc.grid)
        self.cache.put(key, features)
        return features

    def inputs(self, indices: Sequence[int]) -> dict[str, Any]:
        """Model inputs for these questions (left-padded, as `encode_samples` pads)."""
        rows = [self.encoded[i].ids for i in indices]
        input_ids, attention_mask = pad_rows(rows, self._pad_id(), left=True)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": build_mm_token_type_ids(input_ids, self.ck.geometry).to(
                torch.long
            ),
            "image_grid_thw": torch.tensor([self.encoded[i].grid for i in indices]),
            "mm_encoder_outputs": encoder_outputs(self._batch_features(indices)),
        }

    def _batch_features(self, indices: Sequence[int]) -> list[ImageFeatures]:
        """Features per question; an image asked twice in the batch is looked up once."""
        seen: dict[str, ImageFeatures] = {}
        out = []
        for i in indices:
            key = self.encoded[i].image_key
            if key not in seen:
                seen[key] = self.features(i)
            out.append(seen[key])
        return out

    def prefix_groups(self, indices: Sequence[int]) -> list[tuple[list[int], int]]:
        """Runs of questions on the same image in `indices`, each with its shared prefix length.

        The prefix is the longest common start of the questions' token ids (system prompt,
        image, common words), leaving each question at least one token of its own; it must hold
        every image token, otherwise each question forms its own group.
        """
        runs: list[list[int]] = []
        for i in indices:
            if runs and self.encoded[runs[-1][0]].image_key == self.encoded[i].image_key:
                runs[-1].append(i)
            else:
                runs.append([i])
        groups: list[tuple[list[int], int]] = []
        image_token = self.ck.geometry.image_token_id
        for run in runs:
            ids = [self.encoded[i].ids for i in run]
            shortest = min(r.numel() for r in ids)
            same = torch.stack([r[: shortest - 1] for r in ids]).eq(ids[0][: shortest - 1]).all(0)
            common = int(same.numel() if same.all() else same.long().argmin())
            last_image = int((ids[0] == image_token).nonzero().max())
            if common > last_image:
                groups.append((run, common))
            else:  # a prompt with text before the image that differs: no sharing
                groups.extend(([i], self.encoded[i].ids.numel() - 1) for i in run)
        return groups

    def system_length(self) -> int:
        """Length of the prompt start every question shares before its first image token (the
        chat template's system prompt); computed once."""
        if self._system_length is None:
            image_token = self.ck.geometry.image_token_id
            first = self.encoded[0].ids
            length = min(int((e.ids == image_token).long().argmax()) for e in self.encoded)
            for e in self.encoded:
                same = e.ids[:length].eq(first[:length])
                length = length if bool(same.all()) else int(same.long().argmin())
            self._system_length = length
        return self._system_length

    def prefix_positions(self, index: int, cut: int) -> tuple[torch.Tensor, int]:
        """M-RoPE positions (3, cut) of question `index`'s first `cut` tokens and the rope delta
        of its image (model's public get_rope_index); computed once per run and prefix."""
        key = (index, cut)
        if key not in self._positions:
            ids = self.encoded[index].ids[:cut][None]
            inputs = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": build_mm_token_type_ids(ids, self.ck.geometry).to(torch.long),
                "image_grid_thw": torch.tensor([self.encoded[index].grid]),
            }
            positions, deltas = self.ck.adapter.rope_index(self.ck.model, inputs)
            self._positions[key] = (positions[:, 0].to("cpu"), int(deltas.reshape(-1)[0]))
        return self._positions[key]

    def shared_prefix_logits(
        self, indices: Sequence[int], session: PrefixSession | None = None
    ) -> torch.Tensor:
        """Next-token logits (len(indices), vocab) computing each shared prompt part once.

        The system prompt's KV cache comes from `session` (one per configuration; a fresh one
        when None), each image's prefix runs once for its questions, and only the questions'
        own ~20 tokens run per question (`probes.shared_prefix`). About half the decoder work
        of one full forward per question; logits agree with it to float rounding (~1e-6 fp32).
        """
        return shared_prefix_logits(self, indices, session or PrefixSession())

    def _pad_id(self) -> int:
        tok = self.ck.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _compute(self, pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> ImageFeatures:
        self.cache.computed += 1
        return compute_image_features(self.ck.model, pixel_values, grid)

    def _feature_bytes(self, grid: tuple[int, int, int]) -> int:
        """Bytes one image's features will take, from its grid (to skip useless vision runs)."""
        geo = self.ck.geometry
        tokens = grid[0] * grid[1] * grid[2] // geo.merge_size**2
        vision = self.ck.adapter.vision_tower(self.ck.model)
        element = torch.empty((), dtype=vision.dtype).element_size()
        return tokens * geo.hidden_size * (1 + len(geo.deepstack_layers)) * element


GRAY_LEVEL = 128  # the gray-image control's pixel value in every RGB channel


def gray_image(image: Any) -> Any:
    """A uniform gray RGB image of `image`'s size: the same image tokens, no visual content."""
    from PIL import Image

    return Image.new("RGB", image.size, (GRAY_LEVEL,) * 3)


# -- answering -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """One question's answer: the text scored (officially parsed) and what produced it."""

    prediction: str  # "Yes"/"No"/OTHER_PREDICTION (logits) or the decoded text (generate)
    top_token: int  # greedy next token (logits) / first generated token (generate)
    yes_logit: float | None = None  # best yes-variant logit (logits mode)
    no_logit: float | None = None


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


LABEL_PREDICTION = {"yes": "Yes", "no": "No", "other": OTHER_PREDICTION}


def yes_no_answers(logits: torch.Tensor, tokens: YesNoTokens) -> list[Answer]:
    """Answers from next-token logits (B, vocab): the official label of the argmax token.

    The best yes / no variant logits are kept beside it (how close the other answer was).
    """
    yes = logits[:, list(tokens.yes)].max(dim=-1).values.float().cpu()
    no = logits[:, list(tokens.no)].max(dim=-1).values.float().cpu()
    top = logits.argmax(dim=-1).cpu()
    return [
        Answer(LABEL_PREDICTION[tokens.first_token_label(t)], int(t), float(y), float(n))
        for y, n, t in zip(yes.tolist(), no.tolist(), top.tolist(), strict=True)
    ]


def answer_logits(model: Any, inputs: dict[str, Any], tokens: YesNoTokens) -> list[Answer]:
    """One full forward per question (a batch of model inputs); yes/no from the last logits."""
    device = model_device(model)
    inputs = adapter_of(model).with_positions(model, inputs)  # fresh, whatever ran before
    with torch.no_grad():
        logits = model(**_to_device(inputs, device), logits_to_keep=1).logits[:, -1, :]
    return yes_no_answers(logits, tokens)


def answer_generate(
    model: Any, tokenizer: Any, inputs: dict[str, Any], max_new_tokens: int = GENERATE_TOKENS
) -> list[Answer]:
    """Greedy decoding of up to `max_new_tokens` tokens per question (the lmms-eval way)."""
    device = model_device(model)
    adapter = adapter_of(model)
    stop = adapter.stop_token_ids(model, tokenizer)
    eos_ids = set(stop)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), adapter.fresh_rope_cache(model):
        sequences = model.generate(
            **_to_device(inputs, device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=stop,
        )
    answers = []
    for row in sequences[:, prompt_len:].tolist():
        kept: list[int] = []
        for token in row:
            if token in eos_ids:
                break
            kept.append(token)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        answers.append(Answer(text, int(row[0]) if row else -1))
    return answers


def answer_questions(
    bank: MMEInputs,
    batches: Sequence[Sequence[int]],
    answering: str = "logits",
    tokens: YesNoTokens | None = None,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
    start_layer: int = 0,
) -> dict[int, Answer]:
    """Answer the questions of `batches` (one configuration); answers keyed by index into
    `bank.questions`.

    `share_prefix` (logits mode) computes the system prompt once for the configuration and
    each image's common prompt prefix once for its questions (`MMEInputs.shared_prefix_logits`);
    off, every question gets its own full forward. `start_layer` > 0 says every ablated head of
    this configuration lies in layers >= start_layer, so the layers below may be skipped with
    recorded inputs (`bank.layer_store`); the answers are the same either way.
    """
    if answering not in ANSWERING_MODES:
        raise VlmCreditError(f"answering {answering!r}: choose one of {', '.join(ANSWERING_MODES)}")
    model = bank.ck.model
    if answering == "logits" and tokens is None:
        tokens = yes_no_tokens(bank.ck.tokenizer)
    session = PrefixSession(start_layer=start_layer)  # this configuration's system-prompt KV
    out: dict[int, Answer] = {}
    for batch in batches:
        if answering == "generate":
            answers = answer_generate(model, bank.ck.tokenizer, bank.inputs(batch))
        elif share_prefix:
            logits = bank.shared_prefix_logits(batch, session)
            answers = yes_no_answers(logits, tokens)  # type: ignore[arg-type]
        else:
            answers = answer_logits(model, bank.inputs(batch), tokens)  # type: ignore[arg-type]
        out.update(zip(batch, answers, strict=True))
        if on_batch:
            on_batch(len(batch))
    return out
