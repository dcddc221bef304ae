"""Which attention heads a pipeline averages: --layers/--heads, or the vision-critical heads
of a probe-heads run (--heads-json). Shared by `anchors` and `weights`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmcredit.errors import VlmCreditError


@dataclass
class HeadChoice:
    """Which attention to aggregate: capture options and the (layer, head) pairs to average."""

    layers: list[int]
    heads: list[int]
    reduce: str  # "mean" when every captured (layer, head) is averaged, else "heads"
    pairs: list[tuple[int, int]] | None  # absolute (layer, head); None = all captured
    source: str  # "all", "--layers/--heads" or the heads.json path


def choose_heads(
    layers_spec: str | None,
    heads_spec: str | None,
    heads_json: Path | None,
    num_layers: int,
    num_heads: int,
) -> HeadChoice:
    """The attention to average from --layers/--heads, or the critical heads of a heads.json."""
    from vlmcredit.models.selection import parse_indices

    layers = parse_indices(layers_spec, num_layers, "--layers") or list(range(num_layers))
    if heads_json is None:
        heads = parse_indices(heads_spec, num_heads, "--heads") or list(range(num_heads))
        source = "all" if layers_spec in (None, "all") and heads_spec in (None, "all") else "select"
        return HeadChoice(layers, heads, "mean", None, source)
    from vlmcredit.formats.heads import heads_outside, read_heads

    critical = read_heads(Path(heads_json))["critical"]
    if not critical:
        raise VlmCreditError(
            f"--heads-json {heads_json}: lists no vision-critical heads (lower the "
            "probe-heads --threshold, or run anchors without --heads-json)"
        )
    problem = heads_outside(critical, num_layers, num_heads)
    if problem:
        raise VlmCreditError(
            f"--heads-json {heads_json}: {problem} (heads.json from another checkpoint?)"
        )
    pairs: list[tuple[int, int]] = []
    for entry in critical:
        head = int(entry["head"])
        if entry.get("layer") is None:
            pairs.extend((layer, head) for layer in layers)
        elif int(entry["layer"]) in layers:
            pairs.append((int(entry["layer"]), head))
    if not pairs:
        raise VlmCreditError(
            f"--heads-json {heads_json}: none of its critical heads lies in --layers"
        )
    used_layers = sorted({p[0] for p in pairs})
    used_heads = sorted({p[1] for p in pairs})
    if len(pairs) == len(used_layers) * len(used_heads):  # a full grid: let capture average it
        return HeadChoice(used_layers, used_heads, "mean", None, str(heads_json))
    return HeadChoice(used_layers, used_heads, "heads", sorted(pairs), str(heads_json))


def pair_indices(
    pairs: Sequence[tuple[int, int]] | None, layers: Sequence[int], heads: Sequence[int]
) -> list[tuple[int, int]] | None:
    """Absolute (layer, head) pairs -> indices into a captured (L, H, ...) block."""
    if pairs is None:
        return None
    lpos = {layer: i for i, layer in enumerate(layers)}
    hpos = {head: i for i, head in enumerate(heads)}
    missing = [p for p in pairs if p[0] not in lpos or p[1] not in hpos]
    if missing:
        raise VlmCreditError(
            f"the capture run lacks (layer, head) {missing[0]} that --heads-json asks for; "
            "capture those layers with --reduce heads, or run anchors with --ckpt"
        )
    return [(lpos[layer], hpos[head]) for layer, head in pairs]


def chosen_pairs(choice: HeadChoice) -> list[tuple[int, int]] | None:
    """The choice as absolute (layer, head) pairs for methods that read chosen heads' Q/K
    (`SamplePasses.head_choice`); None when nothing was chosen (every head of every layer)."""
    if choice.pairs is not None:
        return list(choice.pairs)
    if choice.source == "all":
        return None
    return [(layer, head) for layer in choice.layers for head in choice.heads]
