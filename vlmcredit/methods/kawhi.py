"""KAWHI (Key-Region Aligned Weighted Harmonic Incentive): paragraph weights from Q/K alignment.

Per response (paper Sec. 3.2-3.4, Alg. 2):
1. SGUF key regions of each image on the merged-token grid (`vlmcredit.analysis.sguf`);
2. alpha_t (Eq. 12-13): cosine of the response token's query and each selected image token's
   key (post-RoPE, GQA-expanded), final decoder layer, vision-critical heads; mean over heads
   and selected tokens. The mean of cosines over tokens is q_hat . mean(k_hat), so the cost is
   O(H (T + N_s) d), not O(H T N_s d);
3. paragraphs (split on "\\n\\n", a token belongs where its first character lies), abar_j =
   mean alpha (Eq. 14), w_j by Eq. 15; every token of paragraph j gets w_j.

Alignment ablations (paper Table 3, `-p alignment=`): "key-key" compares the response tokens'
post-RoPE *keys* with the image keys, "pre-rope" uses queries and keys taken before the rotary
embedding. They read `Needs.qk_states` (states recomputed from the layer's input by a hook in
the same forward, `vlmcredit.probes.qk_states`); the default "query-key" reads the captured Q/K
and costs nothing more.

The critical heads are the run's head choice (`--heads-json RUN/heads.json`, or `--heads`;
online: `heads=[...]`), carried in `SamplePasses.head_choice`; `heads="all"` is the paper's
"w/o critical head" ablation. Extra signal columns: `alpha` per token, and the core
`paragraph_id`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmcredit.analysis.paragraphs import (
    GRANULARITIES,
    WeightConfig,
    segment_means,
    segment_weights,
    token_segments,
)
from vlmcredit.analysis.sguf import SgufConfig, SgufResult, resize_for_grid, sguf
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register

HEAD_SOURCES = ("critical", "all")
# the paper's query-key, then the Table 3 "Reward Metric" and "Positional Encoding" ablations
ALIGNMENTS = ("query-key", "key-key", "pre-rope")


@dataclass
class KawhiConfig:
    """KAWHI parameters (`-p NAME=VALUE`, `-p sguf.NAME=VALUE`).

    tau, lam: Eq. 15 temperature and uniform share; the paper gives no values, ours are
    tau = 0.1, lam = 0.1 (see `vlmcredit.analysis.paragraphs.WeightConfig`).
    w_min, w_max: the paper's [0.1, 1.0]. renormalize: rescale each response's weights to
    token-mean 1 (False = the paper: the mean falls as the paragraph count grows).
    granularity: paragraph (the paper), sentence or token (ablations).
    heads: "critical" = the run's chosen heads (needs --heads-json or --heads), "all" = every
    head (ablation). layer: the decoder layer of Q/K (-1 = final, the paper's).
    alignment: what alpha compares with the selected image tokens' keys (Eq. 12), all at
    `layer`, GQA-expanded: "query-key" = the response tokens' post-RoPE queries vs post-RoPE
    keys (the paper); "key-key" = the response tokens' post-RoPE keys vs post-RoPE keys (Table
    3, Reward Metric ablation); "pre-rope" = queries vs keys before the rotary embedding, after
    Qwen3-VL's q/k norm (Table 3, Positional Encoding ablation).
    """

    tau: float = 0.1
    lam: float = 0.1
    w_min: float = 0.1
    w_max: float = 1.0
    renormalize: bool = False
    granularity: str = "paragraph"
    heads: str = "critical"
    layer: int = -1
    alignment: str = "query-key"
    sguf: SgufConfig = field(default_factory=SgufConfig)

    def weight_config(self) -> WeightConfig:
        return WeightConfig(self.tau, self.lam, self.w_min, self.w_max, self.renormalize)

    def check(self) -> None:
        self.weight_config().check()
        self.sguf.check()
        if self.granularity not in GRANULARITIES:
            raise VlmCreditError(
                f"kawhi granularity={self.granularity!r}: choose one of {', '.join(GRANULARITIES)}"
            )
        if self.heads not in HEAD_SOURCES:
            raise VlmCreditError(
                f"kawhi heads={self.heads!r}: choose critical (the run's --heads-json) or all"
            )
        if self.layer < -1:
            raise VlmCreditError(f"kawhi layer={self.layer}: use a layer index, or -1 for the last")
        if self.alignment not in ALIGNMENTS:
            raise VlmCreditError(
                f"kawhi alignment={self.alignment!r}: choose one of {', '.join(ALIGNMENTS)}"
            )


@dataclass
class KawhiDetail:
    """One response's intermediate results (for the regions/paragraph tables and the report)."""

    alpha: np.ndarray  # (T,) float32
    segment: np.ndarray  # (T,) int32
    bounds: list[tuple[int, int]]  # character [start, end) per segment
    mean_alpha: np.ndarray  # (M,)
    weights: np.ndarray  # (M,)
    regions: list[SgufResult]  # per image
    selected: np.ndarray  # (N,) bool over the sample's image tokens
    heads: list[int]


def needs(cfg: KawhiConfig) -> Needs:
    if cfg.alignment == "query-key":  # the captured post-RoPE Q/K
        return Needs(qk_layers=(cfg.layer,), images=True, text=True)
    return Needs(qk_states=((cfg.alignment, cfg.layer),), images=True, text=True)


def image_key(sample_id: str, image: int) -> int:
    """The per-image seed key: stable across runs, batches and processes."""
    return zlib.crc32(f"{sample_id}/{image}".encode())


def sample_regions(sample: SamplePasses, cfg: SgufConfig) -> tuple[list[SgufResult], np.ndarray]:
    """SGUF of each image of the sample and the (N,) selection over its image tokens."""
    if sample.image_cells is None or sample.image_owner is None or not len(sample.image_owner):
        raise VlmCreditError(
            f"sample {sample.sample_id}: has no image tokens; KAWHI aligns the response with "
            "image regions (drop text-only rows or pass --skip-bad)"
        )
    if not sample.cell_pixels:
        raise VlmCreditError(f"sample {sample.sample_id}: the image grid geometry is missing")
    owner = np.asarray(sample.image_owner)
    cells = np.asarray(sample.image_cells)
    selected = np.zeros(owner.shape[0], dtype=bool)
    results = []
    for k in range(int(owner.max()) + 1):
        if k >= len(sample.images):
            raise VlmCreditError(
                f"sample {sample.sample_id}: image {k} has tokens but was not passed (images pass)"
            )
        tokens = np.flatnonzero(owner == k)
        rows = int(cells[tokens, 1].max()) + 1
        cols = int(cells[tokens, 2].max()) + 1
        if cells[tokens, 0].max() > 0:
            raise VlmCreditError(f"sample {sample.sample_id}: image {k} has several frames")
        rgb = resize_for_grid(sample.images[k], rows, cols, sample.cell_pixels)
        result = sguf(rgb, sample.cell_pixels, cfg, key=image_key(sample.sample_id, k))
        flat = cells[tokens, 1] * cols + cells[tokens, 2]
        selected[tokens] = result.selected[flat]
        results.append(result)
    return results, selected


def chosen_heads(sample: SamplePasses, layer: int, num_heads: int, source: str) -> list[int]:
    """The query heads of `layer` the alignment averages."""
    if source == "all":
        return list(range(num_heads))
    if sample.head_choice is None:
        raise VlmCreditError(
            "kawhi: needs the vision-critical heads: pass --heads-json RUN/heads.json (or "
            "--heads LIST; online: heads=[...]), or -p heads=all for the paper's ablation"
        )
    heads = sorted({h for layer_, h in sample.head_choice if layer_ == layer})
    if not heads:
        raise VlmCreditError(
            f"kawhi: the chosen heads include none of decoder layer {layer}, whose Q/K KAWHI "
            "reads (a heads.json in layer-head mode lists other layers?)"
        )
    if heads[-1] >= num_heads:
        raise VlmCreditError(f"kawhi: head {heads[-1]} does not exist (the layer has {num_heads})")
    return heads


def alignment(queries: np.ndarray, keys: np.ndarray, selected: np.ndarray, heads: list[int]):
    """alpha (T,) float32: Eq. 12-13, the mean over heads and selected keys of the cosine."""
    q = np.asarray(queries, dtype=np.float64)[heads]  # (H, T, D)
    k = np.asarray(keys, dtype=np.float64)[heads][:, selected]  # (H, N_s, D)
    q_hat = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k_hat = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    k_mean = k_hat.mean(axis=1)  # (H, D): the mean of cosines is a dot with the mean key
    return np.einsum("htd,hd->t", q_hat, k_mean).astype(np.float32) / len(heads)


def _qk_layer(sample: SamplePasses, layer: int) -> int:
    if not sample.queries or not sample.keys:
        raise VlmCreditError(f"sample {sample.sample_id}: the Q/K pass did not run")
    return max(sample.queries) if layer == -1 else layer


def response_and_image_states(
    sample: SamplePasses, cfg: KawhiConfig
) -> tuple[int, np.ndarray, np.ndarray]:
    """(absolute layer, (H, T, D) response states, (H, N, D) image keys) of the alignment."""
    if cfg.alignment == "query-key":
        layer = _qk_layer(sample, cfg.layer)
        if layer not in sample.queries or layer not in sample.keys:
            raise VlmCreditError(f"sample {sample.sample_id}: no Q/K captured for layer {layer}")
        return layer, sample.queries[layer], sample.keys[layer]
    found = [layer for kind, layer in sample.qk_states if kind == cfg.alignment]
    if not found:
        raise VlmCreditError(
            f"sample {sample.sample_id}: the {cfg.alignment} Q/K states pass did not run"
        )
    layer = max(found) if cfg.layer == -1 else cfg.layer
    if (cfg.alignment, layer) not in sample.qk_states:
        raise VlmCreditError(
            f"sample {sample.sample_id}: no {cfg.alignment} Q/K states for layer {layer}"
        )
    response, image = sample.qk_states[(cfg.alignment, layer)]
    return layer, response, image


def compute_one(sample: SamplePasses, cfg: KawhiConfig) -> MethodOutput:
    layer, queries, keys = response_and_image_states(sample, cfg)
    regions, selected = sample_regions(sample, cfg.sguf)
    if not selected.any():
        raise VlmCreditError(
            f"sample {sample.sample_id}: the {cfg.sguf.selection} selection kept no image "
            "token (inverse of a selection that keeps every token?)"
        )
    heads = chosen_heads(sample, layer, queries.shape[0], cfg.heads)
    alpha = alignment(queries, keys, selected, heads)
    if sample.response_text is None or sample.token_spans is None:
        raise VlmCreditError(f"sample {sample.sample_id}: the response text pass did not run")
    segment, bounds = token_segments(sample.response_text, sample.token_spans, cfg.granularity)
    if alpha.shape[0] == 0:
        weights = means = np.zeros(0)
        w_tok = np.zeros(0, dtype=np.float32)
    else:
        means = segment_means(alpha, segment)
        weights = segment_weights(means, cfg.weight_config(), np.bincount(segment))
        w_tok = weights[segment].astype(np.float32)
    detail = KawhiDetail(alpha, segment, bounds, means, weights, regions, selected, heads)
    return MethodOutput(
        weight=w_tok,
        columns={"paragraph_id": segment.astype(np.int32), "alpha": alpha},
        detail=detail,
    )


def compute(passes: Sequence[SamplePasses], cfg: Any) -> list[MethodOutput]:
    return [compute_one(sample, cfg) for sample in passes]


KAWHI = register(
    Method(
        name="kawhi",
        summary="KAWHI: paragraph weights from Q/K alignment of the response with SGUF key "
        "regions on vision-critical heads",
        paper="KAWHI (Key-Region Aligned Weighted Harmonic Incentive), Han et al.",
        config=KawhiConfig,
        needs=needs,
        compute=compute,
        # Eq. 17 multiplies the advantage of every response token; GRPO's denominator stays.
        loss_denominator="all_tokens",
        selection_scope="per_response",
        columns={"alpha": "float32"},
    )
)
