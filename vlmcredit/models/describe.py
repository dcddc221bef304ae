"""Describe a checkpoint from its config and safetensors headers, without loading weights.

Reading headers instead of tensors keeps `vlmcredit info` instant on a 72B checkpoint.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from vlmcredit.models.families import ModelGeometry, adapter_for
from vlmcredit.models.loading import (
    check_checkpoint_files,
    check_tokenizer,
    read_model_type,
    read_safetensors_header,
    resolve_checkpoint,
)

_DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8"}


def safetensors_summary(folder: Path) -> tuple[int, str]:
    """(parameter count, dominant dtype) from the headers of every *.safetensors file."""
    count = 0
    dtypes: Counter[str] = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        header = read_safetensors_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= int(dim)
            count += n
            dtypes[entry["dtype"]] += n
    dominant = dtypes.most_common(1)[0][0] if dtypes else "?"
    return count, _DTYPE_NAMES.get(dominant, dominant.lower())


def describe_checkpoint(
    ckpt: str | os.PathLike[str], trust_remote_code: bool = False
) -> dict[str, Any]:
    """The facts `vlmcredit info` prints, as a flat dict."""
    from transformers import AutoConfig

    folder = resolve_checkpoint(ckpt)
    source = str(ckpt)
    adapter = adapter_for(read_model_type(folder, source), f"--ckpt {source}")
    check_checkpoint_files(folder, source)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    geo = ModelGeometry.from_config(config, f"--ckpt {source}")
    params, dtype = safetensors_summary(folder)
    # The tokenizer alone (no image processor, no weights): a tokenizer larger than the
    # vocabulary belongs to another checkpoint, and `info` is where a user checks a folder.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    check_tokenizer(tokenizer, geo, source)
    facts: dict[str, Any] = {
        "checkpoint": source,
        "path": str(folder),
        "family": adapter.cli_name,
        "model_type": adapter.model_type,
        "layers": geo.num_layers,
        "heads": geo.num_heads,
        "kv_heads": geo.num_kv_heads,
        "head_dim": geo.head_dim,
        "hidden_size": geo.hidden_size,
        "vision_patch_size": geo.patch_size,
        "vision_merge_size": geo.merge_size,
        "pixels_per_image_token": geo.cell_pixels,
        "image_token_id": geo.image_token_id,
        "vision_start_token_id": geo.vision_start_token_id,
        "vision_end_token_id": geo.vision_end_token_id,
        "deepstack_layers": list(geo.deepstack_layers),
        "vocab_size": geo.vocab_size,
        "tokenizer_tokens": len(tokenizer),
        "dtype": dtype,
        "parameters": params,
    }
    if geo.num_experts:
        facts["experts"] = geo.num_experts
    return facts
