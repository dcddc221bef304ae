"""Next-token logits of MME questions with every shared part of their prompts computed once.

An MME prompt is [system prompt | image + common question words | the question's own words]:

* The system prompt (the chat template's tokens before the first image) is the same for every
  question: its KV cache is computed once per configuration (`PrefixSession`), and each batch
  starts from a copy. Not once per run: an ablation changes it (head h ablated in every layer
  changes every layer's output).
* The image part (image tokens and the words both questions of the image share) runs once per
  image, one row per image continuing the system cache, right-padded: pads are masked as keys,
  and their own outputs are never read.
* Each question's own ~20 tokens run on its image's cache row (right-padded too).

Layer-head shortcut (`start_layer` > 0, every ablated head in layers >= start): the input of
layer `start` is the baseline's for every token, since nothing below it changes. The first
configuration that starts at a layer records those inputs per batch (`LayerInputStore`, bounded)
while it runs; the next configurations of the same layer run only layers `start`.. from them,
through the family adapter (`run_decoder_from`, Qwen3-VL deepstack included). Logits agree
with the full path to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmcredit.models.families import model_device
from vlmcredit.models.layout import build_mm_token_type_ids
from vlmcredit.probes.image_features import encoder_outputs


@dataclass
class LayerInputStore:
    """Hidden states entering one decoder layer, per question batch; bounded in bytes.

    Holds one layer at a time: layer-head configurations come layer by layer, and asking for
    another layer drops the previous one's entries. `max_bytes` 0 disables the shortcut.
    """

    max_bytes: int
    layer: int | None = None
    nbytes: int = 0
    hits: int = 0
    recorded: int = 0
    rejected: int = 0
    unsupported: str | None = None  # why the model cannot start at a layer (counted in `skipped`)
    skipped: int = 0  # batches that ran in full because of `unsupported`
    _items: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def get(self, layer: int, key: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
        if layer != self.layer:
            self._items.clear()
            self.layer, self.nbytes = layer, 0
        item = self._items.get(key)
        self.hits += item is not None
        return item

    def put(self, layer: int, key: tuple[int, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if layer != self.layer or self.nbytes + size > self.max_bytes:
            self.rejected += 1
            return
        self._items[key] = tensors
        self.nbytes += size
        self.recorded += 1

    def stats(self) -> dict[str, Any]:
        return {
            "max_bytes": self.max_bytes,
            "layer": self.layer,
            "bytes": self.nbytes,
            "hits": self.hits,
            "recorded": self.recorded,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "unsupported": self.unsupported,
        }


@dataclass
class PrefixSession:
    """One configuration's shared state: the system prompt's KV cache and its start layer.

    Make one per configuration (inside its ablation), never reuse it across configurations.
    """

    start_layer: int = 0
    system: Any = None  # KV cache (batch 1) of the system prompt, made at the first batch


def shared_prefix_logits(bank: Any, indices: Sequence[int], session: PrefixSession) -> torch.Tensor:
    """Next-token logits (len(indices), vocab) of questions `indices` of `bank` (MMEInputs)."""
    ck = bank.ck
    model, adapter = ck.model, ck.adapter
    inner = adapter.base_model(model)
    device = model_device(model)
    pad = bank._pad_id()
    k = bank.system_length()
    groups = bank.prefix_groups(indices)
    if session.system is None:
        session.system = _system_cache(bank, k, device)
    # image parts: one row per image, after the system prompt
    starts = [bank.prefix_positions(g[0], cut) for g, cut in groups]
    parts = [bank.encoded[g[0]].ids[k:cut] for g, cut in groups]
    part_ids, part_mask = pad_rows(parts, pad, left=False)
    part_pos = torch.zeros((3, len(parts), part_ids.shape[1]), dtype=torch.long)
    for row, ((positions, _), part) in enumerate(zip(starts, parts, strict=True)):
        part_pos[:, row, : part.numel()] = positions[:, k:]
    part_mask = torch.cat([torch.ones((len(parts), k), dtype=torch.long), part_mask], dim=1)
    features = [bank.features(g[0]) for g, _ in groups]
    part_inputs = {
        "input_ids": part_ids,
        "mm_token_type_ids": build_mm_token_type_ids(part_ids, ck.geometry).to(torch.long),
        "image_grid_thw": torch.tensor([bank.encoded[g[0]].grid for g, _ in groups]),
        "mm_encoder_outputs": encoder_outputs(features),
    }
    # questions' own tokens, one row per question on its image's cache row
    owner = torch.tensor([j for j, (g, _) in enumerate(groups) for _ in g])
    order = [i for g, _ in groups for i in g]
    cuts = [cut for g, cut in groups for _ in g]
    suffixes = [bank.encoded[i].ids[cut:] for i, cut in zip(order, cuts, strict=True)]
    suffix_ids, suffix_mask = pad_rows(suffixes, pad, left=False)
    deltas = torch.tensor([delta for _, delta in starts])
    first = torch.tensor(cuts) + deltas[owner]  # M-RoPE position of each question's first token
    suffix_pos = first[:, None] + torch.arange(suffix_ids.shape[1])[None, :]
    suffix_pos = suffix_pos[None].expand(3, -1, -1)
    suffix_mask = torch.cat([part_mask[owner], suffix_mask], dim=1)
    suffix_inputs = {"input_ids": suffix_ids}

    cache = copy.deepcopy(session.system)
    cache.batch_repeat_interleave(len(parts))
    start = session.start_layer
    store = bank.layer_store
    if start > 0 and store.max_bytes > 0 and store.unsupported is None:
        store.unsupported = adapter.layer_start_support(model)
    shortcut = start > 0 and store.max_bytes > 0 and store.unsupported is None
    if start > 0 and store.max_bytes > 0 and store.unsupported is not None:
        store.skipped += 1
    key = tuple(indices)
    recorded = store.get(start, key) if shortcut else None

    def forward(inputs: dict[str, Any], positions: torch.Tensor, mask: torch.Tensor) -> Any:
        return inner(
            **_to_device(inputs, device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_kwarg(inner): cache},
        ).last_hidden_state

    def from_start(hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, **kw: Any):
        return adapter.run_decoder_from(
            model, hidden, start, position_ids=positions.to(device),
            attention_mask=mask.to(device), cache=cache, **kw,
        )  # fmt: skip

    with torch.no_grad():
        if not shortcut:
            forward(part_inputs, part_pos, part_mask)
            cache.batch_select_indices(owner)
            hidden = forward(suffix_inputs, suffix_pos, suffix_mask)
        else:
            image_rows = part_ids.eq(ck.geometry.image_token_id)
            deep = _deepstack(features, start) if start < len(features[0].deepstack) else None
            if recorded is None:  # run the layers below `start` too, keeping their inputs
                part_in = adapter.decoder_input_at(
                    model, start, lambda: forward(part_inputs, part_pos, part_mask)
                )
            else:
                part_in = recorded[0]
            from_start(part_in, part_pos, part_mask, visual_mask=image_rows, deepstack=deep)
            cache.batch_select_indices(owner)
            if recorded is None:
                suffix_in = adapter.decoder_input_at(
                    model, start, lambda: forward(suffix_inputs, suffix_pos, suffix_mask)
                )
                store.put(start, key, (part_in, suffix_in))
            else:
                suffix_in = recorded[1]
            hidden = from_start(suffix_in, suffix_pos, suffix_mask)
        last = torch.tensor([s.numel() - 1 for s in suffixes], device=hidden.device)
        rows = torch.arange(len(order), device=hidden.device)
        logits = adapter.output_embedding(model)(hidden[rows, last])
    where = {i: row for row, i in enumerate(order)}
    return logits[[where[i] for i in indices]]


def _deepstack(features: Sequence[Any], start: int) -> list[torch.Tensor | None]:
    """Deepstack maps for the image tokens of a batch (rows in order), per deepstack layer;
    layers below `start` (already added into the recorded inputs) are None."""
    maps: list[torch.Tensor | None] = [None] * start
    for layer in range(start, len(features[0].deepstack)):
        maps.append(torch.cat([f.deepstack[layer] for f in features]))
    return maps


def _system_cache(bank: Any, k: int, device: torch.device) -> Any:
    """KV cache (batch 1) of the first `k` prompt tokens, shared by every question."""
    from transformers import DynamicCache

    inner = bank.ck.adapter.base_model(bank.ck.model)
    text = bank.ck.adapter.text_model(bank.ck.model)
    cache = DynamicCache(config=text.config)
    if k == 0:
        return cache
    ids = bank.encoded[0].ids[:k][None]
    positions = torch.arange(k)[None, None].expand(3, 1, k)  # text before the image: 0..k-1
    with torch.no_grad():
        inner(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_kwarg(inner): cache},
        )
    return cache


def cache_kwarg(model: Any) -> str:
    """The forward's name for a KV cache to continue: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns and goes in 5.40); 5.20-5.23 know only
    the old one, and would swallow `cache=` silently into their **kwargs."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache of a forward's output, under its 5.24 name `cache` or the older one."""
    names = {f.name for f in dataclasses.fields(output)}
    return output.cache if "cache" in names else output.past_key_values


def pad_rows(
    rows: Sequence[torch.Tensor], pad_id: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id rows into (ids, attention_mask), padding on the left or the right."""
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(length - row.numel(), length) if left else slice(0, row.numel())
        ids[b, cols] = row
        mask[b, cols] = 1
    return ids, mask


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
