"""Response -> image attention and Q/K states, captured beside a normal SDPA forward.

The standard way to read attention weights (eager attention + `output_attentions=True`) holds
every layer's S x S matrix and runs the whole model on the slow path. Instead we register one
attention implementation in transformers' `AttentionInterface` (and `AttentionMaskInterface`,
so padding masks are still built): it computes the layer output with SDPA, and, only while a
capture session is active, recomputes the softmax rows of the chosen query positions (response
tokens) over *all* keys, keeps the chosen key columns (image tokens), reduces them as asked and
moves them to the CPU at once. Rows go in chunks so extra memory is O(chunk x S) per head;
GQA is handled by grouping query heads per kv head, never by repeating keys.

It works in teacher-forced forwards and inside `generate()` (query length 1 and a growing key
cache): query position i of a call with Q queries over S keys is absolute position S - Q + i.
The vision tower keeps plain SDPA.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

CAPTURE_IMPLEMENTATION = "vlmcredit_capture"
Reduce = Literal["heads", "mean", "sum"]
REDUCTIONS = ("heads", "mean", "sum")

_ACTIVE: contextvars.ContextVar[CaptureSession | None] = contextvars.ContextVar(
    "vlmcredit_capture_session", default=None
)


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture. `None` layers/heads mean all of them."""

    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    reduce: Reduce = "heads"
    attention: bool = True
    qk_layers: Sequence[int] = ()  # layers whose post-RoPE Q (response) and K (image) to keep
    # Upper bound on the elements of one chunk of recomputed scores (heads x rows x keys):
    # 2^25 fp32 = 128 MiB. Rows per chunk = max(1, budget // (heads * keys)).
    chunk_elements: int = 1 << 25


@dataclass
class RowTarget:
    """Which query rows and key columns to keep for one batch row (absolute positions)."""

    response_start: int
    response_end: int | None  # None: open-ended (generation)
    key_positions: torch.Tensor  # (N,) long, image-token positions


@dataclass
class SampleCapture:
    """What one sample's capture holds, on the CPU.

    `attention`: (layers, heads', T, N) float32 probabilities of response token t attending to
    image token n, normalised over the full row; heads' = len(heads) for reduce="heads", else 1.
    `queries[layer]`: (H, T, D) post-RoPE query states of response tokens;
    `keys[layer]`: (H, N, D) key states of image tokens, GQA-expanded to query heads.
    """

    layers: list[int]
    heads: list[int]
    reduce: str
    attention: torch.Tensor | None
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_response_tokens(self) -> int:
        if self.attention is not None:
            return int(self.attention.shape[2])
        return int(next(iter(self.queries.values())).shape[1]) if self.queries else 0


class CaptureSession:
    """Collects captured blocks per (layer, batch row) during one or more forwards."""

    def __init__(
        self, spec: CaptureSpec, targets: Sequence[RowTarget], num_layers: int, num_heads: int
    ) -> None:
        if spec.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {spec.reduce!r}")
        self.spec = spec
        self.targets = list(targets)
        self.attn_layers = sorted(set(range(num_layers) if spec.layers is None else spec.layers))
        self.heads = sorted(set(range(num_heads) if spec.heads is None else spec.heads))
        self.qk_layers = sorted(set(spec.qk_layers))
        for layer in [*self.attn_layers, *self.qk_layers]:
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer {layer} out of range (model has {num_layers})")
        for head in self.heads:
            if not 0 <= head < num_heads:
                raise ValueError(f"head {head} out of range (model has {num_heads})")
        self._all_heads = len(self.heads) == num_heads
        self._attn: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._queries: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._keys: dict[tuple[int, int], torch.Tensor] = {}
        self._wanted = set(self.attn_layers if spec.attention else []) | set(self.qk_layers)
        self._head_index: dict[torch.device, torch.Tensor] = {}

    # -- called from the attention function ---------------------------------------------------
    def observe(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        layer = int(module.layer_idx)
        if layer not in self._wanted:
            return
        _, heads, q_len, head_dim = query.shape
        kv_len = key.shape[2]
        q_offset = kv_len - q_len  # absolute position of query row 0
        scale = float(scaling) if scaling is not None else head_dim**-0.5
        want_attn = self.spec.attention and layer in self.attn_layers
        want_qk = layer in self.qk_layers
        for b, target in enumerate(self.targets):
            kpos = target.key_positions
            if (
                want_qk
                and (layer, b) not in self._keys
                and kpos.numel()
                and int(kpos.max()) < kv_len
            ):
                groups = heads // key.shape[1]
                keys = key[b][:, kpos.to(key.device)]  # (Hkv, N, D)
                self._keys[(layer, b)] = keys.repeat_interleave(groups, dim=0).float().cpu()
            end = kv_len if target.response_end is None else min(target.response_end, kv_len)
            lo, hi = max(target.response_start, q_offset), end
            if hi <= lo:
                continue
            r0, r1 = lo - q_offset, hi - q_offset
            if want_qk:
                self._queries.setdefault((layer, b), []).append(query[b, :, r0:r1].float().cpu())
            if want_attn:
                block = self._attention_rows(
                    query[b], key[b], attention_mask, b, r0, r1, q_offset, kpos, scale
                )
                self._attn.setdefault((layer, b), []).append(block)

    def _attention_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        mask: torch.Tensor | None,
        b: int,
        r0: int,
        r1: int,
        q_offset: int,
        kpos: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Softmax rows r0:r1 of one batch row over all keys, image columns kept, reduced."""
        heads, _, head_dim = q.shape
        kv_heads, kv_len, _ = k.shape
        groups = heads // kv_heads
        kpos = kpos.to(q.device)
        head_index = self._head_index.get(q.device)
        if head_index is None:
            head_index = torch.tensor(self.heads, device=q.device)
            self._head_index[q.device] = head_index
        chunk = max(1, self.spec.chunk_elements // max(1, heads * kv_len))
        k_t = k.transpose(-1, -2)  # (Hkv, D, S): a view, no copy
        pieces = []
        for c0 in range(r0, r1, chunk):
            c1 = min(r1, c0 + chunk)
            rows = c1 - c0
            # (H, rows, D) -> (Hkv, G*rows, D): query heads grouped under their kv head.
            qc = q[:, c0:c1].reshape(kv_heads, groups * rows, head_dim)
            scores = torch.matmul(qc, k_t).view(heads, rows, kv_len) * scale
            scores = scores.float()
            if mask is None:  # unpadded: pure causal
                cols = torch.arange(kv_len, device=q.device)
                qpos = torch.arange(c0, c1, device=q.device) + q_offset
                scores = scores.masked_fill((cols[None, :] > qpos[:, None])[None], float("-inf"))
            else:
                m = mask[b, 0, c0:c1, :kv_len]
                if m.dtype == torch.bool:
                    scores = scores.masked_fill(~m[None], float("-inf"))
                else:
                    scores = scores + m[None].float()
            probs = torch.softmax(scores, dim=-1)
            image = probs.index_select(-1, kpos)  # (H, rows, N)
            if not self._all_heads:
                image = image.index_select(0, head_index)
            if self.spec.reduce == "mean":
                image = image.mean(0, keepdim=True)
            elif self.spec.reduce == "sum":
                image = image.sum(0, keepdim=True)
            pieces.append(image.cpu())
        return torch.cat(pieces, dim=1)

    # -- results ------------------------------------------------------------------------------
    def result(self, b: int, num_tokens: int | None = None) -> SampleCapture:
        """Batch row b's capture; `num_tokens` trims generated rows (e.g. after EOS)."""
        n_img = int(self.targets[b].key_positions.numel())
        heads = self.heads if self.spec.reduce == "heads" else [-1]
        attention = None
        if self.spec.attention:
            per_layer = []
            for layer in self.attn_layers:
                chunks = self._attn.get((layer, b))
                if chunks:
                    per_layer.append(torch.cat(chunks, dim=1))
                else:
                    per_layer.append(torch.zeros(len(heads), 0, n_img))
            attention = torch.stack(per_layer)[:, :, :num_tokens]
        queries = {
            layer: torch.cat(self._queries[(layer, b)], dim=1)[:, :num_tokens]
            for layer in self.qk_layers
            if (layer, b) in self._queries
        }
        keys = {
            layer: self._keys[(layer, b)] for layer in self.qk_layers if (layer, b) in self._keys
        }
        return SampleCapture(
            list(self.attn_layers), list(heads), self.spec.reduce, attention, queries, keys
        )


def capture_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """SDPA for the layer output; the side capture when a session is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )
    session = _ACTIVE.get()
    if session is not None:
        with torch.no_grad():
            session.observe(module, query, key, attention_mask, scaling)
    return output


def register_capture_attention() -> str:
    """Register the capture implementation (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # Both registrations are needed: without the mask one, transformers silently builds no
    # padding mask for an unknown implementation and left-padded batches go wrong.
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    return CAPTURE_IMPLEMENTATION


def use_capture_attention(model: Any) -> None:
    """Switch the decoder to the capture implementation; the vision tower stays on SDPA.

    Outside a session the implementation is plain SDPA, so a model can stay switched (e.g.
    inside a training loop) at no cost.
    """
    register_capture_attention()
    if model.config.text_config._attn_implementation != CAPTURE_IMPLEMENTATION:
        vision = model.config.vision_config._attn_implementation or "sdpa"
        model.set_attn_implementation(
            {"text_config": CAPTURE_IMPLEMENTATION, "vision_config": vision}
        )


@contextmanager
def capture_session(
    model: Any, spec: CaptureSpec, targets: Sequence[RowTarget]
) -> Iterator[CaptureSession]:
    """Activate a capture for the forwards (or `generate`) run inside the block."""
    use_capture_attention(model)
    text = model.config.text_config
    session = CaptureSession(spec, targets, text.num_hidden_layers, text.num_attention_heads)
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)
