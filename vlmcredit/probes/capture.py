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

from vlmcredit.models.families import adapter_of

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
    # Take each row's log-sum-exp from the fused CPU attention kernel when it applies (faster);
    # False always uses the portable path (plain SDPA + chunked recompute of the full rows).
    kernel_lse: bool = True


@dataclass
class RowTarget:
    """Which query rows and key columns to keep for one batch row (absolute positions)."""

    response_start: int
    response_end: int | None  # None: open-ended (generation)
    key_positions: torch.Tensor  # (N,) long, image-token positions
    _runs: list[tuple[int, int]] | None = field(default=None, repr=False)

    def runs(self) -> list[tuple[int, int]]:
        """Image positions as contiguous [start, end) runs (one per image): slicing runs is
        far cheaper than gathering columns."""
        if self._runs is None:
            pos = self.key_positions.detach().cpu().tolist()
            runs: list[tuple[int, int]] = []
            for p in pos:
                if runs and runs[-1][1] == p:
                    runs[-1] = (runs[-1][0], p + 1)
                else:
                    runs.append((p, p + 1))
            self._runs = runs
        return self._runs


@dataclass(frozen=True)
class _RowBlock:
    b: int  # batch row
    r0: int  # first query row (index into this call's queries)
    r1: int
    q_offset: int  # absolute position of query row 0
    scale: float


def _take_runs(x: torch.Tensor, runs: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """Concatenate slices [a, b) of `x` along `dim` (a view when there is one run)."""
    if len(runs) == 1:
        a, b = runs[0]
        return x.narrow(dim, a, b - a)
    if not runs:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in runs], dim=dim)


def _mask_columns(
    image: torch.Tensor, mask_rows: torch.Tensor, runs: list[tuple[int, int]]
) -> torch.Tensor:
    """Apply a (rows, S) bool or additive mask to image-column scores (H, rows, N)."""
    m = _take_runs(mask_rows, runs, dim=-1)
    if m.dtype == torch.bool:
        return image.masked_fill_(~m[None], float("-inf"))
    return image.add_(m[None].float())


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
        self,
        spec: CaptureSpec,
        targets: Sequence[RowTarget],
        num_layers: int,
        num_heads: int,
        attention_layers: Sequence[int] | None = None,
    ) -> None:
        """`attention_layers`: absolute indices of the decoder layers with self-attention
        (default all); a hybrid decoder's linear-attention layers are left out of "all layers"
        and cannot be asked for."""
        if spec.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {spec.reduce!r}")
        self.spec = spec
        self.targets = list(targets)
        with_attn = range(num_layers) if attention_layers is None else sorted(attention_layers)
        self.attn_layers = sorted(set(with_attn if spec.layers is None else spec.layers))
        self.heads = sorted(set(range(num_heads) if spec.heads is None else spec.heads))
        self.qk_layers = sorted(set(spec.qk_layers))
        for layer in [*self.attn_layers, *self.qk_layers]:
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer {layer} out of range (model has {num_layers})")
            if layer not in with_attn:
                raise ValueError(f"layer {layer} has no self-attention (linear-attention layer)")
        for head in self.heads:
            if not 0 <= head < num_heads:
                raise ValueError(f"head {head} out of range (model has {num_heads})")
        self._all_heads = len(self.heads) == num_heads
        self._attn: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._queries: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._keys: dict[tuple[int, int], torch.Tensor] = {}
        self._wanted = set(self.attn_layers if spec.attention else []) | set(self.qk_layers)
        self._head_index: dict[torch.device, torch.Tensor] = {}
        # Diagnostics: layer calls whose row log-sum-exp came from the fused CPU kernel, and
        # those that fell back to plain SDPA + the chunked recompute (a torch upgrade that
        # drops or changes the kernel shows up here, not as a silent slowdown).
        self.kernel_lse_calls = 0
        self.recomputed_lse_calls = 0

    # -- called from the attention function ---------------------------------------------------
    def wants(self, layer: int) -> bool:
        return layer in self._wanted

    def observe(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        lse: torch.Tensor | None = None,
    ) -> None:
        """Record what this layer call contributes. `lse`: (B, H, Q) row log-sum-exp, if the
        attention kernel already computed it (then only the image columns are scored)."""
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
            runs = target.runs()
            if want_qk and (layer, b) not in self._keys and runs and runs[-1][1] <= kv_len:
                groups = heads // key.shape[1]
                keys = _take_runs(key[b], runs, dim=1)  # (Hkv, N, D)
                self._keys[(layer, b)] = keys.repeat_interleave(groups, dim=0).float().cpu()
            end = kv_len if target.response_end is None else min(target.response_end, kv_len)
            lo, hi = max(target.response_start, q_offset), end
            if hi <= lo:
                continue
            r0, r1 = lo - q_offset, hi - q_offset
            if want_qk:
                self._queries.setdefault((layer, b), []).append(query[b, :, r0:r1].float().cpu())
            if want_attn:
                rows = _RowBlock(b, r0, r1, q_offset, scale)
                block = self._attention_rows(
                    query[b], key[b], attention_mask, rows, runs, None if lse is None else lse[b]
                )
                self._attn.setdefault((layer, b), []).append(block)

    def _attention_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        mask: torch.Tensor | None,
        rows: _RowBlock,
        runs: list[tuple[int, int]],
        lse: torch.Tensor | None,
    ) -> torch.Tensor:
        """Probabilities of rows r0:r1 (one batch row) on the image columns, reduced.

        p = exp(score - logsumexp(row)), the same numbers as softmax over all keys. With the
        kernel's log-sum-exp only the image columns are scored; otherwise the full row is
        scored in chunks (O(chunk x S) memory) to get it.
        """
        heads, _, head_dim = q.shape
        kv_heads, kv_len, _ = k.shape
        groups = heads // kv_heads
        # Scores in fp32 from bf16/fp16 q and k, as flash kernels compute them: scores rounded
        # to bf16 before the exp carry ~1% median error (up to ~9% at score magnitudes ~20-40).
        k_img_t = _take_runs(k, runs, dim=1).transpose(-1, -2).float() if lse is not None else None
        k_t = k.transpose(-1, -2)  # (Hkv, D, S): a view, no copy (upcast per chunk below)
        if k_t.dtype != torch.float32:
            k_t = k_t.float()
        chunk = max(1, self.spec.chunk_elements // max(1, heads * kv_len))
        pieces = []
        for c0 in range(rows.r0, rows.r1, chunk):
            c1 = min(rows.r1, c0 + chunk)
            n = c1 - c0
            # (H, n, D) -> (Hkv, G*n, D): query heads grouped under their kv head (no repeat).
            qc = (q[:, c0:c1].float() * rows.scale).reshape(kv_heads, groups * n, head_dim)
            if lse is not None:
                image = torch.matmul(qc, k_img_t).view(heads, n, -1)
                row_lse = lse[:, c0:c1, None].float()
                if mask is not None:
                    image = _mask_columns(image, mask[rows.b, 0, c0:c1], runs)
            else:
                scores = torch.matmul(qc, k_t).view(heads, n, kv_len)
                scores = self._mask_scores(scores, mask, rows, c0, c1)
                row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
                image = _take_runs(scores, runs, dim=-1)
            image = image.sub_(row_lse).exp_()  # (H, n, N)
            if not self._all_heads:
                image = image.index_select(0, self._heads_on(image.device))
            if self.spec.reduce == "mean":
                image = image.mean(0, keepdim=True)
            elif self.spec.reduce == "sum":
                image = image.sum(0, keepdim=True)
            pieces.append(image.cpu())
        return torch.cat(pieces, dim=1)

    @staticmethod
    def _mask_scores(
        scores: torch.Tensor, mask: torch.Tensor | None, rows: _RowBlock, c0: int, c1: int
    ) -> torch.Tensor:
        kv_len = scores.shape[-1]
        if mask is None:
            # Unpadded: pure causal. Only keys after the first row's position can be masked.
            first = c0 + rows.q_offset
            if first + 1 < kv_len:
                qpos = torch.arange(c0, c1, device=scores.device) + rows.q_offset
                cols = torch.arange(first + 1, kv_len, device=scores.device)
                tail = scores[..., first + 1 :]
                tail.masked_fill_((cols[None, :] > qpos[:, None])[None], float("-inf"))
            return scores
        m = mask[rows.b, 0, c0:c1, :kv_len]
        if m.dtype == torch.bool:
            return scores.masked_fill_(~m[None], float("-inf"))
        return scores.add_(m[None].float())

    def _heads_on(self, device: torch.device) -> torch.Tensor:
        index = self._head_index.get(device)
        if index is None:
            index = torch.tensor(self.heads, device=device)
            self._head_index[device] = index
        return index

    # -- results ------------------------------------------------------------------------------
    def result(self, b: int, num_tokens: int | None = None) -> SampleCapture:
        """Batch row b's capture; `num_tokens` trims generated rows (e.g. after EOS).

        Hands the collected blocks over (each is read once): chunks are copied into the result
        and released layer by layer, so the peak is the result plus one layer, not twice it.
        """
        n_img = int(self.targets[b].key_positions.numel())
        heads = self.heads if self.spec.reduce == "heads" else [-1]
        attention = None
        if self.spec.attention:
            chunks_per_layer = [self._attn.pop((layer, b), []) for layer in self.attn_layers]
            total = max((sum(c.shape[1] for c in chunks) for chunks in chunks_per_layer), default=0)
            rows = total if num_tokens is None else min(total, num_tokens)
            attention = torch.zeros(len(self.attn_layers), len(heads), rows, n_img)
            for i, chunks in enumerate(chunks_per_layer):
                start = 0
                while chunks and start < rows:
                    piece = chunks.pop(0)
                    take = min(piece.shape[1], rows - start)
                    attention[i, :, start : start + take] = piece[:, :take]
                    start += take
        queries = {
            layer: torch.cat(self._queries.pop((layer, b)), dim=1)[:, :num_tokens]
            for layer in self.qk_layers
            if (layer, b) in self._queries
        }
        keys = {
            layer: self._keys.pop((layer, b))
            for layer in self.qk_layers
            if (layer, b) in self._keys
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

    session = _ACTIVE.get()
    if session is None or not session.wants(int(module.layer_idx)):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    fused = None
    # The direct kernel call records no autograd graph: with grad on (a capture inside a
    # training step) the layer output must come from plain SDPA, or gradients stop here.
    if session.spec.kernel_lse and not torch.is_grad_enabled():
        fused = _cpu_sdpa_with_lse(module, query, key, value, attention_mask, scaling, kwargs)
    if fused is None:
        session.recomputed_lse_calls += 1
        output = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
        lse = None
    else:
        session.kernel_lse_calls += 1
        output, lse = fused
    with torch.no_grad():
        session.observe(module, query, key, attention_mask, scaling, lse)
    return output


def _cpu_sdpa_with_lse(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[tuple[torch.Tensor, None], torch.Tensor] | None:
    """On CPU, the same fused flash kernel that `F.scaled_dot_product_attention` dispatches to,
    called directly because it also returns each row's log-sum-exp: then the capture scores only
    the image columns. Returns None where that kernel does not apply (other devices, dropout,
    sliding windows, grad), and the caller falls back to plain SDPA + a chunked recompute."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if (
        op is None
        or query.device.type != "cpu"
        or torch.is_grad_enabled()
        or kwargs.get("dropout", 0.0)
        or kwargs.get("sliding_window")
        or kwargs.get("softcap") is not None
        or query.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        # Under autocast (e.g. a trainer's bf16=True on CPU) RoPE leaves q/k in fp32 while v
        # comes out of the projection in bf16; F.sdpa reconciles that through autocast, the
        # direct kernel call cannot.
        or not (query.dtype == key.dtype == value.dtype)
    ):
        return None
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
        else:
            mask = mask.to(query.dtype)
    is_causal = mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out, lse = op(query, key, value, 0.0, is_causal, attn_mask=mask, scale=scaling)
    return (out.transpose(1, 2).contiguous(), None), lse


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
    a benchmark's model) at no cost. This does not switch back: `capture_session` and
    `capture_attention` switch only for their block and restore what the model had.
    """
    register_capture_attention()
    if model.config.text_config._attn_implementation != CAPTURE_IMPLEMENTATION:
        vision = model.config.vision_config._attn_implementation or "sdpa"
        model.set_attn_implementation(
            {"text_config": CAPTURE_IMPLEMENTATION, "vision_config": vision}
        )


def _attention_configs(model: Any) -> list[Any]:
    """Every config object whose attention implementation `set_attn_implementation` may write:
    the model's, its sub-configs at any depth and each sub-model's own (usually shared)."""
    found: dict[int, Any] = {}
    pending = [model.config]
    pending += [m.config for m in model.modules() if hasattr(m, "config") and m is not model]
    while pending:
        config = pending.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return list(found.values())


@contextmanager
def capture_attention(model: Any) -> Iterator[None]:
    """The decoder on the capture implementation inside the block only.

    On exit, also on an exception, every config's attention implementation is put back exactly
    as it was (top, text and vision, nested sub-configs): a policy loaded with eager or flash
    attention keeps it after `vlmcredit.online` measured a batch with it. Restored on the
    configs directly (what `set_attn_implementation` writes), so an implementation the model
    was loaded with is never re-checked or re-dispatched.
    """
    saved = [(c, c._attn_implementation_internal) for c in _attention_configs(model)]
    try:
        use_capture_attention(model)
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


@contextmanager
def capture_session(
    model: Any, spec: CaptureSpec, targets: Sequence[RowTarget]
) -> Iterator[CaptureSession]:
    """Activate a capture for the forwards (or `generate`) run inside the block.

    The decoder runs on the capture implementation only inside the block: on exit, also on an
    exception, every attention implementation is back to what it was (see `capture_attention`).
    """
    text = model.config.text_config
    with_attn = [layer.index for layer in adapter_of(model).attention_layers(model)]
    session = CaptureSession(
        spec, targets, text.num_hidden_layers, text.num_attention_heads, with_attn
    )
    with capture_attention(model):
        token = _ACTIVE.set(session)
        try:
            yield session
        finally:
            _ACTIVE.reset(token)
