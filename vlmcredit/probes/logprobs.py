"""Teacher-forced scoring: log p of each taken response token and the next-token entropy.

Three input variants, each one forward of the decoder per batch:
  image      the real prompt and image;
  no_image   the prompt re-templated without the image (no image tokens, no pixel values), as
             ToR asks; prompt ids a trainer recorded lose their vision_start..vision_end spans;
  perturbed  the real prompt with patches of the image blacked out (VPPO); black is pixel value
             0 after the image processor's rescale and normalisation.

Memory and cost: the forward returns the decoder's last hidden states; the LM head runs on
`CHUNK` response positions at a time (every response of the batch in one run of chunks), so no
(T x vocab) tensor outlives its chunk. Each chunk is then processed in cache-sized row blocks
(`BLOCK`) on buffers allocated once: the log-softmax in fp32 whatever the model dtype (a bf16
softmax over 150k entries loses the small probabilities the entropy sums), the taken token's
log p, the entropy from the same probabilities, and for top_p < 1 the nucleus by a histogram
search instead of a sort (`_nucleus_entropy`). Every requested (temperature, top_p) is scored
from the same logits; one log-softmax per temperature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry, adapter_of, model_device
from vlmcredit.models.inputs import EncodedBatch, encode_samples
from vlmcredit.models.layout import prompt_mm_token_type_ids

CHUNK = 256  # response positions per LM-head chunk: 256 x 152k fp32 logits = 155 MB
# logits per post-processing block (2 MB fp32): the softmax, entropy and nucleus passes over one
# block run in cache on buffers allocated once per pass; a fresh chunk-sized tensor per op costs
# more in page faults than the op itself (benchmarks/RESULTS.md, log-probability methods)
BLOCK = 1 << 19
NUCLEUS_BINS = 2048  # log-probability bins of the nucleus search (at most; ~32 tokens a bin)
NUCLEUS_SPAN = 100.0  # nats below a row's top the bins cover; rarer tokens share the last bin
VARIANTS = ("image", "no_image", "perturbed")

Score = tuple[float, float]  # (temperature, top_p)
# per response: (temperature, top_p) -> (log p of the taken token (T,), entropy (T,) or None
# when the variant's entropy was not asked for), float32
RowScores = dict[Score, tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Perturbation:
    """Black out patches with `probability`; `patch_px` pixels square on the resized image."""

    probability: float = 0.5
    patch_px: int = 14
    cells: bool = False  # patches = the merged image-token cells instead of patch_px squares
    seed: int = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Perturbation:
        return cls(**dict(options)) if options else cls()


# -- the scores ----------------------------------------------------------------------------------
class _Workspace:
    """(rows, vocab) buffers for one block of rows, allocated on first use, reused by each block."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = max(1, BLOCK // max(vocab, 1))
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            shape = (self.rows, self.vocab)
            buf = torch.empty(shape, dtype=dtype or self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:n]


def entropy_from_logprobs(logprobs: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of each row of log-probabilities, in their dtype; with top_p < 1 of the
    nucleus: the most probable tokens until their mass reaches top_p (the one crossing it
    included), renormalised. Exact for any distribution (see `_nucleus_entropy`)."""
    rows, vocab = logprobs.shape
    ws = _Workspace(vocab, logprobs.dtype, logprobs.device)
    out = torch.empty(rows, dtype=logprobs.dtype, device=logprobs.device)
    for start in range(0, rows, ws.rows):
        lp = logprobs[start : start + ws.rows]
        p = torch.exp(lp, out=ws.get("p", lp.shape[0]))
        out[start : start + ws.rows] = _entropy(lp, p, top_p, ws)
    return out


def _entropy(lp: torch.Tensor, p: torch.Tensor, top_p: float, ws: _Workspace) -> torch.Tensor:
    if top_p < 1.0:
        return _nucleus_entropy(lp, p, top_p, ws)
    # log p = -inf (p = 0) counts 0; a NaN stays NaN
    floor = torch.finfo(lp.dtype).min
    plogp = torch.clamp(lp, min=floor, out=ws.get("tmp", lp.shape[0])).mul_(p)
    return -plogp.sum(-1)


def _nucleus_entropy(
    lp: torch.Tensor, p: torch.Tensor, top_p: float, ws: _Workspace
) -> torch.Tensor:
    """The top-p entropy without sorting the vocabulary.

    The kept tokens are those of the descending sort up to the first whose cumulative mass
    reaches top_p. Bin each row's tokens by log p below its top (a monotone map, so bins follow
    the sorted order): one histogram of the mass per bin finds the bin that crosses top_p; the
    bins above are kept whole, the ones below dropped, and only the crossing bin's tokens are
    sorted, so ties and boundaries resolve as a full sort would. Sums past the histogram are
    float64.
    """
    n, nb = lp.shape[0], min(NUCLEUS_BINS, max(16, lp.shape[1] // 32))
    top = lp.amax(-1, keepdim=True)
    span = (top - lp.amin(-1, keepdim=True)).clamp_(min=1e-6, max=NUCLEUS_SPAN)
    tmp = ws.get("tmp", n)
    scaled = torch.sub(top, lp, out=tmp).mul_((nb - 1) / span).clamp_(max=nb - 1)  # -inf -> last
    scaled.nan_to_num_(nan=0.0)  # a valid bin; a NaN row (NaN logits) still comes out NaN
    bins = ws.get("bins", n, torch.long)
    bins.copy_(scaled)  # truncation: bin 0 holds the most probable tokens
    # float64 from here: a bin of ten thousand tied tokens summed in float32 moves the cut
    p64 = p if p.dtype == torch.float64 else ws.get("p64", n, torch.float64).copy_(p)
    plogp = torch.mul(p64, lp, out=ws.get("plogp64", n, torch.float64))
    plogp.nan_to_num_(0.0)  # 0 * -inf -> 0
    mass = p64.new_zeros(n, nb).scatter_add_(1, bins, p64)
    mass_plogp = p64.new_zeros(n, nb).scatter_add_(1, bins, plogp)
    cum = mass.cumsum(-1)
    cross = (cum < top_p).sum(-1, keepdim=True).clamp_(max=nb - 1)  # first bin reaching top_p
    above = (cum - mass).gather(1, cross)[:, 0]
    above_plogp = (mass_plogp.cumsum(-1) - mass_plogp).gather(1, cross)[:, 0]
    # the crossing bin's tokens, row by row in descending probability
    r, c = torch.eq(bins, cross, out=ws.get("in_bin", n, torch.bool)).nonzero(as_tuple=True)
    vals, vals_plogp = p64[r, c], plogp[r, c]
    order = vals.argsort(descending=True, stable=True)
    order = order[r[order].argsort(stable=True)]
    r, vals, vals_plogp = r[order], vals[order], vals_plogp[order]
    excl = vals.cumsum(0) - vals  # across rows; each row's offset is removed below
    counts = torch.bincount(r, minlength=n)
    first = (counts.cumsum(0) - counts)[r]
    keep = above[r] + (excl - excl[first]) < top_p  # mass of the more probable tokens < top_p
    kept = above.index_add(0, r, torch.where(keep, vals, 0.0))
    kept_plogp = above_plogp.index_add(0, r, torch.where(keep, vals_plogp, 0.0))
    # renormalised q = p / kept: -sum q log q = log kept - sum p log p / kept
    return (kept.log() - kept_plogp / kept).to(lp.dtype)


def score_hidden(
    hidden: torch.Tensor,
    head: Any,
    targets: torch.Tensor,
    scores: Sequence[Score],
    entropy: bool = True,
) -> RowScores:
    """Scores of response positions: `hidden` (T, D) are the states that predict `targets`
    (T,). With entropy=False only log p is computed (the entropy arrays are None).

    Per LM-head chunk, per block of rows (BLOCK): one fp32 log-softmax per temperature, the
    taken token's log p, and per requested top_p the entropy from the same probabilities."""
    n = hidden.shape[0]
    top_ps: dict[float, list[float]] = {}
    for temperature, top_p in scores:
        top_ps.setdefault(float(temperature), []).append(float(top_p))
    dev = hidden.device
    logp = {t: torch.empty(n, device=dev) for t in top_ps}
    ents = {(t, p): torch.empty(n, device=dev) for t, ps in top_ps.items() for p in ps}
    ws: _Workspace | None = None
    for start in range(0, n, CHUNK):
        logits = head(hidden[start : start + CHUNK])
        if ws is None:
            ws = _Workspace(logits.shape[-1], torch.float32, logits.device)
        for s in range(0, logits.shape[0], ws.rows):
            x = logits[s : s + ws.rows]
            m, at = x.shape[0], start + s
            taken = targets[at : at + m, None]
            for temperature, ps in top_ps.items():
                scaled = x
                if x.dtype != torch.float32 or temperature != 1.0:
                    scaled = ws.get("scaled", m).copy_(x)  # fp32 before dividing
                    if temperature != 1.0:
                        scaled.div_(temperature)
                lp = torch.log_softmax(scaled, -1, out=ws.get("lp", m))
                logp[temperature][at : at + m] = lp.gather(-1, taken)[:, 0]
                if entropy:
                    p = torch.exp(lp, out=ws.get("p", m))
                    for top_p in ps:
                        ents[(temperature, top_p)][at : at + m] = _entropy(lp, p, top_p, ws)
        del logits
    out: RowScores = {}
    for score in scores:
        t, p = float(score[0]), float(score[1])
        out[score] = (_numpy(logp[t]), _numpy(ents[(t, p)]) if entropy else None)
    return out


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.to("cpu", torch.float32).numpy()


def score_inputs(
    model: Any,
    inputs: Mapping[str, Any],
    spans: Sequence[tuple[int, int]],
    scores: Sequence[Score],
    entropy: bool = True,
) -> list[RowScores]:
    """One teacher-forced forward of `inputs`; per row b the scores of tokens spans[b]."""
    device = model_device(model)
    adapter = adapter_of(model)
    batch = {k: v.to(device) for k, v in inputs.items() if v is not None}
    batch = adapter.with_positions(model, batch)  # fresh positions, whatever ran before
    with torch.no_grad():
        # the decoder's last (normed) hidden states: the LM head runs later, chunk by chunk
        hidden = adapter.base_model(model)(**batch, use_cache=False).last_hidden_state
        return scores_from_hidden(model, hidden, batch["input_ids"], spans, scores, entropy)


def scores_from_hidden(
    model: Any,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    scores: Sequence[Score],
    entropy: bool = True,
) -> list[RowScores]:
    """Per row b the scores of tokens spans[b], from the decoder's last hidden states (B, S, D)
    of a forward over `ids` (this module's forward, or a capture forward that kept them)."""
    head = adapter_of(model).output_embedding(model)
    with torch.no_grad():
        # every response's positions in one run of LM-head chunks (short responses fill them);
        # the state at position p predicts the token at p + 1
        kept = [(b, s, e) for b, (s, e) in enumerate(spans) if e > s]
        empty = np.zeros(0, np.float32)
        rows: list[RowScores] = [
            {s: (empty, empty if entropy else None) for s in scores} for _ in spans
        ]
        if not kept:
            return rows
        states = torch.cat([hidden[b, s - 1 : e - 1] for b, s, e in kept])
        targets = torch.cat([ids[b, s:e].to(states.device) for b, s, e in kept])
        scored = score_hidden(states, head, targets, scores, entropy)
    offsets = np.cumsum([0] + [e - s for _, s, e in kept])
    for (b, _, _), lo, hi in zip(kept, offsets[:-1], offsets[1:], strict=True):
        rows[b] = {
            score: (logp[lo:hi], None if ent is None else ent[lo:hi])
            for score, (logp, ent) in scored.items()
        }
    return rows


def score_encoded(
    model: Any, batch: EncodedBatch, scores: Sequence[Score], entropy: bool = True
) -> list[RowScores]:
    spans = [lay.response_span for lay in batch.layouts]
    return score_inputs(model, batch.inputs, spans, scores, entropy)


# -- input variants of rollout samples -----------------------------------------------------------
def without_image(sample: Sample, geometry: ModelGeometry, response_ids: list[int]) -> Sample:
    """`sample` re-templated with no image: image parts dropped from the prompt (recorded
    prompt ids lose their vision_start..vision_end spans); the response ids are kept as given."""
    prompt = sample.prompt
    prompt_ids = None
    if isinstance(prompt, list):
        prompt = [_drop_image_parts(message) for message in prompt]
    elif prompt is None:
        prompt_ids = strip_vision_spans(list(sample.prompt_ids or []), geometry)
    return replace(sample, images=[], prompt=prompt, prompt_ids=prompt_ids, response=response_ids)


def _drop_image_parts(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    kept = [
        part for part in content if not (isinstance(part, Mapping) and part.get("type") == "image")
    ]
    return {**message, "content": kept}


def strip_vision_spans(ids: Sequence[int], geometry: ModelGeometry) -> list[int]:
    """Token ids without any vision_start ... vision_end span (both markers included)."""
    out: list[int] = []
    inside = False
    for t in ids:
        if t == geometry.vision_start_token_id:
            inside = True
        elif inside and t == geometry.vision_end_token_id:
            inside = False
        elif not inside:
            out.append(int(t))
    if inside:
        raise VlmCreditError("prompt ids open a vision_start span that never ends")
    return out


def sample_seed(seed: int, key: str) -> int:
    """A seed per (run seed, sample): stable across runs, processes and batch compositions."""
    digest = hashlib.sha1(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def blackout_masks(
    grids: torch.Tensor, geometry: ModelGeometry, pert: Perturbation, keys: Sequence[str]
) -> list[np.ndarray]:
    """Per image, the (H, W) bool mask of blacked-out pixels of the resized image.

    `grids` is image_grid_thw (one row per image); keys[k] seeds image k's draw.
    """
    side = geometry.cell_pixels if pert.cells else int(pert.patch_px)
    masks = []
    for (_, h, w), key in zip(grids.tolist(), keys, strict=True):
        height, width = h * geometry.patch_size, w * geometry.patch_size
        rng = np.random.default_rng(sample_seed(pert.seed, key))
        rows, cols = -(-height // side), -(-width // side)
        chosen = rng.random((rows, cols)) < float(pert.probability)
        full = np.repeat(np.repeat(chosen, side, axis=0), side, axis=1)
        masks.append(full[:height, :width])
    return masks


def black_values(image_processor: Any) -> torch.Tensor:
    """(C,) what pixel value 0 becomes after the processor's rescale and normalisation."""
    mean = np.asarray(getattr(image_processor, "image_mean", (0.0, 0.0, 0.0)), dtype=np.float64)
    std = np.asarray(getattr(image_processor, "image_std", (1.0, 1.0, 1.0)), dtype=np.float64)
    if not getattr(image_processor, "do_normalize", True):
        return torch.zeros(mean.shape[0], dtype=torch.float32)
    return torch.tensor(-mean / std, dtype=torch.float32)


def perturb_pixel_values(
    pixel_values: torch.Tensor,
    grids: torch.Tensor,
    geometry: ModelGeometry,
    masks: Sequence[np.ndarray],
    black: torch.Tensor,
) -> torch.Tensor:
    """A copy of the processor's patch rows with the masked pixels set to `black`.

    Qwen's image processor orders each image's rows (t, block row, block col, row in block, col
    in block) with merge x merge blocks, and each row (channel, temporal, y, x); the pixel
    masks are laid out the same way, so only the chosen pixels change.
    """
    out = pixel_values.clone()
    ps, m = geometry.patch_size, geometry.merge_size
    channels = black.shape[0]
    tps = pixel_values.shape[1] // (channels * ps * ps)
    offset = 0
    for (t, h, w), mask in zip(grids.tolist(), masks, strict=True):
        n = t * h * w
        grid = torch.from_numpy(mask).reshape(h // m, m, ps, w // m, m, ps)
        per_patch = grid.permute(0, 3, 1, 4, 2, 5).reshape(h * w, ps * ps).repeat(t, 1)
        rows = out[offset : offset + n].view(n, channels, tps, ps * ps)
        fill = black.to(rows.dtype).to(rows.device).view(1, channels, 1, 1)
        where = per_patch.to(rows.device).view(n, 1, 1, ps * ps)
        # a broadcast select: a boolean-index assignment costs ten times as much
        rows.copy_(torch.where(where, fill, rows))
        offset += n
    return out


def score_samples(
    ck: Any,
    samples: Sequence[Sample],
    variants: Sequence[str],
    scores: Sequence[Score],
    perturb: Mapping[str, Any] | None = None,
    entropy_variants: Sequence[str] | None = None,
    scored: Mapping[str, list[RowScores]] | None = None,
) -> dict[str, list[RowScores]]:
    """variant -> per-sample scores of a batch of rollout samples (one forward per variant).

    Entropy is computed for `entropy_variants` only (None = all): the passes a method reads
    log p from alone skip its cost. `scored`: variants already scored in another forward (the
    real image, from the attention capture's forward), used as they are."""
    out: dict[str, list[RowScores]] = dict(scored or {})
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise VlmCreditError(f"logprobs variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    todo = [v for v in variants if v not in out]

    def want(variant: str) -> bool:
        return entropy_variants is None or variant in entropy_variants

    batch = encode_samples(ck.processor, ck.geometry, samples)
    if "image" in todo:
        out["image"] = score_encoded(ck.model, batch, scores, want("image"))
    if "no_image" in todo:
        bare = [
            without_image(s, ck.geometry, ids)
            for s, ids in zip(samples, batch.response_ids, strict=True)
        ]
        bare_batch = encode_samples(ck.processor, ck.geometry, bare)
        out["no_image"] = score_encoded(ck.model, bare_batch, scores, want("no_image"))
    if "perturbed" in todo:
        out["perturbed"] = score_encoded(
            ck.model,
            perturbed_batch(ck, batch, samples, Perturbation.from_options(perturb)),
            scores,
            want("perturbed"),
        )
    return out


def perturbed_batch(
    ck: Any, batch: EncodedBatch, samples: Sequence[Sample], pert: Perturbation
) -> EncodedBatch:
    """`batch` with each image's patches blacked out (seeded by the sample id and image index)."""
    if "pixel_values" not in batch.inputs:
        return batch
    keys = [f"{s.id}/{k}" for s in samples for k in range(len(s.images))]
    grids = batch.inputs["image_grid_thw"]
    masks = blackout_masks(grids, ck.geometry, pert, keys)
    pixels = perturb_pixel_values(
        batch.inputs["pixel_values"],
        grids,
        ck.geometry,
        masks,
        black_values(ck.processor.image_processor),
    )
    return EncodedBatch({**batch.inputs, "pixel_values": pixels}, batch.layouts, batch.response_ids)


# -- trainer batches (vlmcredit.online) ------------------------------------------------------------
def score_trainer_batch(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    lengths: Sequence[int],
    variants: Sequence[str],
    scores: Sequence[Score],
    perturb: Mapping[str, Any] | None = None,
    black: torch.Tensor | None = None,
    entropy_variants: Sequence[str] | None = None,
    scored: Mapping[str, list[RowScores]] | None = None,
) -> dict[str, list[RowScores]]:
    """The variants on a trainer batch (prompt block left padded + response block); entropy
    for `entropy_variants` only (None = all), as in `score_samples`; `scored` variants (scored
    in another forward over this batch) are used as they are."""

    def want(variant: str) -> bool:
        return entropy_variants is None or variant in entropy_variants

    geo = ModelGeometry.from_config(model.config)
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    spans = [(start, start + n) for n in lengths]
    base = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        if k in batch
    }
    base["mm_token_type_ids"] = prompt_mm_token_type_ids(input_ids, geo, start).to(torch.long)
    out: dict[str, list[RowScores]] = dict(scored or {})
    if "image" in variants and "image" not in out:
        out["image"] = score_inputs(model, base, spans, scores, want("image"))
    if "no_image" in variants:
        inputs, bare_spans = _without_images(batch, geo, lengths)
        out["no_image"] = score_inputs(model, inputs, bare_spans, scores, want("no_image"))
    if "perturbed" in variants:
        perturbed = _perturbed_trainer_inputs(base, geo, perturb, black)
        out["perturbed"] = score_inputs(model, perturbed, spans, scores, want("perturbed"))
    return out


def _without_images(
    batch: Mapping[str, torch.Tensor], geo: ModelGeometry, lengths: Sequence[int]
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    input_ids = batch["input_ids"].cpu()
    mask = batch["attention_mask"].cpu()
    width = batch["response_mask"].shape[1]
    start = input_ids.shape[1] - width
    prompts = [
        strip_vision_spans(input_ids[b, :start][mask[b, :start].bool()].tolist(), geo)
        for b in range(input_ids.shape[0])
    ]
    new_start = max(len(p) for p in prompts)
    # pad id 0: any vocabulary id works under attention mask 0
    ids = torch.zeros((input_ids.shape[0], new_start + width), dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, prompt in enumerate(prompts):
        ids[b, new_start - len(prompt) : new_start] = torch.tensor(prompt, dtype=torch.long)
        am[b, new_start - len(prompt) : new_start] = 1
        ids[b, new_start:] = input_ids[b, start:]
        am[b, new_start:] = mask[b, start:]
    inputs = {
        "input_ids": ids,
        "attention_mask": am,
        "mm_token_type_ids": torch.zeros_like(ids),
    }
    return inputs, [(new_start, new_start + n) for n in lengths]


def _perturbed_trainer_inputs(
    base: Mapping[str, torch.Tensor],
    geo: ModelGeometry,
    perturb: Mapping[str, Any] | None,
    black: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    if base.get("pixel_values") is None:
        return dict(base)
    if black is None:
        raise VlmCreditError(
            "online: the perturbed-image pass needs the image processor's normalisation to know "
            "what black is: pass processor=<the checkpoint's processor> to vlmcredit.online"
        )
    # seeded by batch row and image index within the row (a trainer batch has no sample ids)
    starts = (base["input_ids"] == geo.vision_start_token_id).sum(dim=1).tolist()
    keys = [f"{b}/{k}" for b, n in enumerate(starts) for k in range(int(n))]
    grids = base["image_grid_thw"]
    if len(keys) != grids.shape[0]:
        raise VlmCreditError(
            f"batch: {grids.shape[0]} images in image_grid_thw but {len(keys)} vision_start "
            "tokens in input_ids"
        )
    pert = Perturbation.from_options(perturb)
    masks = blackout_masks(grids.cpu(), geo, pert, keys)
    pixels = perturb_pixel_values(base["pixel_values"], grids.cpu(), geo, masks, black)
    return {**base, "pixel_values": pixels}
