"""Response -> image attention and Q/K states, captured beside a normal SDPA forward.

The standard way to read attention weights (eager attention + `output_attentions=True`) holds
every layer's S x S matrix and runs the whole model on the slow path. Instead we register one
attention implementation in transformers' `AttentionInterface` (and `AttentionMaskInterface`,
so padding masks are still built): it computes the layer output with SDPA, and, only while a
capture session is active, recomputes the softmax rows of the chosen query positions (response
tokens) over *all* keys, keeps the chosen key columns (image tokens), reduces them as asked and
writes them into one preallocated result per sample. Rows go in cache-sized chunks written
straight into that result (no per-chunk pieces, no concatenation), so the extra memory beyond
the result is O(chunk); GQA is handled by grouping query heads per kv head, never by repeating
keys. Scores are computed in fp32 from bf16/fp16 q and k, as fused attention kernels do.

Where a fused kernel can return each row's log-sum-exp (the CPU flash kernel; on CUDA flash or
memory-efficient attention) the layer output comes from it and only the image columns are
scored: one fp32 product per row chunk with -logsumexp folded in. Elsewhere plain SDPA gives
the output and the full rows are recomputed in chunks (the portable path: same numbers).
On an accelerator the result stays on the device during the forward and is copied out into
pinned host memory once per sample (one synchronisation), not once per chunk; so a per-head
capture holds L x H x T x N values per batch row on the device (`store_dtype="bf16"` halves it).

It works in teacher-forced forwards and inside `generate()` (query length 1 and a growing key
cache): query position i of a call with Q queries over S keys is absolute position S - Q + i.
The vision tower keeps plain SDPA.
"""

from __future__ import annotations

import contextvars
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vlmcredit.models.families import adapter_of
from vlmcredit.probes.capture_store import ResultStore
from vlmcredit.probes.fused_lse import cpu_sdpa_with_lse, sdpa_with_lse

CAPTURE_IMPLEMENTATION = "vlmcredit_capture"
Reduce = Literal["heads", "mean", "sum"]
REDUCTIONS = ("heads", "mean", "sum")
StoreDtype = Literal["fp32", "bf16", "fp16"]
STORE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

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
    # Upper bound on the fp32 scores of one row chunk on the CPU (heads x rows x columns
    # scored: image columns with the kernel's log-sum-exp, all keys otherwise). 2^18 = 1 MiB
    # stays in cache, so each chunk is scored, exponentiated and written out while hot.
    chunk_elements: int = 1 << 18
    # The same bound on an accelerator, where big products are what keeps it busy (256 MiB).
    device_chunk_elements: int = 1 << 26
    # Take each row's log-sum-exp from a fused attention kernel when one applies (faster);
    # False always uses the portable path (plain SDPA + chunked recompute of the full rows).
    kernel_lse: bool = True
    # dtype of the stored probabilities (computed in fp32 either way): bf16/fp16 halve a
    # per-head result at ~0.4% / ~0.05% relative rounding.
    store_dtype: StoreDtype = "fp32"


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

    `attention`: (layers, heads', T, N) probabilities of response token t attending to image
    token n, normalised over the full row; heads' = len(heads) for reduce="heads", else 1.
    Computed in fp32, stored in the spec's `store_dtype` (fp32 unless asked otherwise).
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
    """Writes captured rows per (layer, batch row) during one or more forwards."""

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
        if spec.store_dtype not in STORE_DTYPES:
            raise ValueError(
                f"store_dtype must be one of {tuple(STORE_DTYPES)}, got {spec.store_dtype!r}"
            )
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
        self._layer_index = {layer: i for i, layer in enumerate(self.attn_layers)}
        self._stores: dict[int, ResultStore] = {}
        self._queries: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._keys: dict[tuple[int, int], torch.Tensor] = {}
        self._wanted = set(self.attn_layers if spec.attention else []) | set(self.qk_layers)
        self._head_index: dict[torch.device, torch.Tensor] = {}
        # Diagnostics: layer calls whose row log-sum-exp came from a fused kernel, and those
        # that fell back to plain SDPA + the chunked recompute (a torch upgrade that drops or
        # changes a kernel shows up here, not as a silent slowdown).
        self.kernel_lse_calls = 0
        self.recomputed_lse_calls = 0
        self.kernel_refusals: list[str] = []  # why a fused kernel raised (warned once)

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
                t0 = lo - target.response_start  # row of the result
                out = self._store(b).rows(self._layer_index[layer], t0, t0 + hi - lo, query.device)
                rows = _RowBlock(b, r0, r1, q_offset, scale)
                row_lse = None if lse is None else lse[b]
                self._attention_rows(query[b], key[b], attention_mask, rows, runs, row_lse, out)

    def _store(self, b: int) -> ResultStore:
        store = self._stores.get(b)
        if store is None:
            target = self.targets[b]
            known = target.response_end
            store = ResultStore(
                len(self.attn_layers),
                len(self.heads) if self.spec.reduce == "heads" else 1,
                int(target.key_positions.numel()),
                None if known is None else max(0, known - target.response_start),
                STORE_DTYPES[self.spec.store_dtype],
            )
            self._stores[b] = store
        return store

    def _attention_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        mask: torch.Tensor | None,
        rows: _RowBlock,
        runs: list[tuple[int, int]],
        lse: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """Probabilities of rows r0:r1 (one batch row) on the image columns, reduced and
        written into `out` (H', r1 - r0, N).

        p = exp(score - logsumexp(row)), the same numbers as softmax over all keys. With the
        kernel's log-sum-exp only the image columns are scored, as one product per chunk with
        -lse folded in; otherwise the full row is scored in chunks to get it.
        """
        heads, _, head_dim = q.shape
        kv_heads, kv_len, _ = k.shape
        groups = heads // kv_heads
        # Scores in fp32 from bf16/fp16 q and k, as flash kernels compute them: scores rounded
        # to bf16 before the exp carry ~1% median error (up to ~9% at score magnitudes ~20-40).
        if lse is not None:
            k_t = _take_runs(k, runs, dim=1).transpose(-1, -2).float()  # (Hkv, D, N)
        else:
            k_t = k.transpose(-1, -2)  # (Hkv, D, S): a view, no copy when already fp32
            if k_t.dtype != torch.float32:
                k_t = k_t.float()
        width = k_t.shape[-1]
        budget = self.spec.chunk_elements if q.device.type == "cpu" else None
        budget = budget or self.spec.device_chunk_elements
        chunk = max(1, budget // max(1, heads * width))
        direct = self.spec.reduce == "heads" and self._all_heads and out.dtype == torch.float32
        for c0 in range(rows.r0, rows.r1, chunk):
            c1 = min(rows.r1, c0 + chunk)
            n = c1 - c0
            # (H, n, D) -> (Hkv, G*n, D): query heads grouped under their kv head (no repeat).
            qc = (q[:, c0:c1].float() * rows.scale).reshape(kv_heads, groups * n, head_dim)
            if lse is not None:
                neg_lse = lse[:, c0:c1].float().neg().reshape(kv_heads, groups * n, 1)
                image = torch.baddbmm(neg_lse, qc, k_t).view(heads, n, width)
                if mask is not None:
                    image = _mask_columns(image, mask[rows.b, 0, c0:c1], runs)
            else:
                scores = torch.matmul(qc, k_t).view(heads, n, kv_len)
                scores = self._mask_scores(scores, mask, rows, c0, c1)
                row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
                image = _take_runs(scores, runs, dim=-1).sub_(row_lse)
            dst = out[:, c0 - rows.r0 : c1 - rows.r0]
            if direct:  # exp written straight into the result: no extra pass
                torch.exp(image, out=dst)
                continue
            image = image.exp_()  # (H, n, N)
            if not self._all_heads:
                image = image.index_select(0, self._heads_on(image.device))
            if self.spec.reduce == "mean":
                image = image.mean(0, keepdim=True)
            elif self.spec.reduce == "sum":
                image = image.sum(0, keepdim=True)
            dst.copy_(image)

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
        """Batch row b's capture on the CPU; `num_tokens` trims generated rows (e.g. after EOS).

        Hands the preallocated result over (read once): in teacher forcing it is the very
        tensor the rows were written into, no copy; on an accelerator one copy-out per sample.
        """
        heads = self.heads if self.spec.reduce == "heads" else [-1]
        attention = None
        if self.spec.attention:
            store = self._stores.pop(b, None) or self._store(b)
            self._stores.pop(b, None)
            attention = store.take(num_tokens)
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
        try:
            fused = sdpa_with_lse(module, query, key, value, attention_mask, scaling, kwargs)
        except torch.OutOfMemoryError:
            raise  # not a refusal: the fallback would need more memory, not less
        except RuntimeError as exc:  # a kernel refusing these shapes on this GPU
            _note_refusal(session, exc)
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


def _note_refusal(session: CaptureSession, exc: RuntimeError) -> None:
    """Same numbers from the fallback, but slower: say so once per session, never silently."""
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if not session.kernel_refusals:
        warnings.warn(
            f"capture: the fused attention kernel refused this input ({reason}); using plain "
            "SDPA + an exact recompute of the rows (same values, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
    session.kernel_refusals.append(reason)


# Kept under its old name: tests and callers reach the CPU kernel wrapper through here.
_cpu_sdpa_with_lse = cpu_sdpa_with_lse


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
