"""Build tiny, complete Qwen-VL checkpoints offline (`vlmcredit make-tiny`).

A tiny checkpoint is a real checkpoint folder: config.json, model.safetensors, a trained
byte-level BPE tokenizer with the Qwen special tokens and chat template, and the image
processor config. It loads through exactly the code path a 7B checkpoint does, so tests and the
demo exercise the real thing. Same family + seed gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import CLI_NAMES, FAMILIES

# The Qwen special tokens, in the order Qwen's tokenizers list them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own chat template (handles string content and lists of image/video/text parts).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tokenizer: the words the demo, MME questions and tests use, so that
# common words become single tokens (as in a real vocabulary) and "Yes"/"No" are one token each.
_CORPUS_WORDS = (
    "Yes No yes no Is there a in the image ? Please answer yes or no . Describe what you see "
    "The picture shows red green blue yellow black white orange purple circle square triangle "
    "one two three four five six seven eight nine ten left right above below top bottom "
    "count number of objects color shape text reads answer is because first then so therefore "
    "cat dog car tree house sky person sign road water a an and of to on with at it this that "
    "0 1 2 3 4 5 6 7 8 9 + - = * / ( ) , : ; ! \n\n step reasoning final total sum equals "
)
TINY_VOCAB_SIZE = 640
TINY_IMAGE_MAX_TOKENS = 256  # merged tokens per image: keeps tiny forwards fast on CPU


def build_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, extra_corpus: str = "") -> Any:
    """Train a byte-level BPE on the built-in corpus (plus `extra_corpus`) as a Qwen2Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _CORPUS_WORDS + extra_corpus
    corpus = [words] * 8 + [w for w in words.split(" ") if w]
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={},
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


def _text_config(family: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA: 2 query heads per kv head
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        # mrope_section must sum to head_dim / 2 = 8.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
    }
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        cfg["head_dim"] = 16
        cfg["rope_parameters"]["mrope_interleaved"] = True
    if family == "qwen3_vl_moe":
        cfg.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
        )
    return cfg


def _vision_config(family: str) -> dict[str, Any]:
    common = {
        "depth": 2,
        "num_heads": 2,
        "in_channels": 3,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_vl":
        return {**common, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "patch_size": 14}
    if family == "qwen2_5_vl":
        return {
            **common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    return {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }


def build_config(
    family: str,
    tokenizer: Any,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
) -> Any:
    """The transformers config of a tiny model of `family` whose ids match `tokenizer`."""
    from transformers import AutoConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return AutoConfig.for_model(
        family,
        text_config={**_text_config(family, len(tokenizer), ids), **(text_overrides or {})},
        vision_config={**_vision_config(family), **(vision_overrides or {})},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_image_processor(family: str, max_tokens: int = TINY_IMAGE_MAX_TOKENS) -> Any:
    """Qwen's PIL image processor with at most `max_tokens` merged tokens per image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    patch = 16 if family.startswith("qwen3") else 14
    cell = patch * 2
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={
            "shortest_edge": 4 * cell * cell,
            "longest_edge": max_tokens * cell * cell,
        },
    )


def make_tiny(family: str, out: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a complete tiny checkpoint of `family` (cli or model_type name) to `out`.

    Written to a temporary folder beside `out` and renamed into place, so a killed build
    never leaves a half checkpoint behind.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    model_type = CLI_NAMES.get(family, family)
    if model_type not in FAMILIES:
        raise VlmCreditError(
            f"--family {family!r} is not supported; choose one of {', '.join(sorted(CLI_NAMES))}"
        )
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise VlmCreditError(f"--out {out_path}: is a file; choose a folder for the checkpoint")
    if out_path.exists() and any(out_path.iterdir()):
        raise VlmCreditError(f"--out {out_path} exists and is not empty; choose a new folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    config = build_config(model_type, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _reinit_deterministic(model, seed)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id

    return save_checkpoint(model, tokenizer, build_image_processor(model_type), out_path)


def save_checkpoint(model: Any, tokenizer: Any, image_processor: Any, out_path: Path) -> Path:
    """Write a complete checkpoint folder atomically: a temporary folder beside `out_path`,
    renamed into place, so a killed write never leaves half a checkpoint behind."""
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_path.parent))
    try:
        from transformers.utils import logging as hf_logging

        # A one-shard, sub-MB checkpoint: transformers' "Writing model shards" bar is noise.
        was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if was_on:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
        _normalise_json_files(tmp)
        _user_permissions(tmp)
        if out_path.exists():
            out_path.rmdir()
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _user_permissions(folder: Path) -> None:
    """mkdtemp (0700) and the safetensors writer (0600) hide files from other accounts; give the
    checkpoint what a plain mkdir/open would under the user's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _reinit_deterministic(model: Any, seed: int) -> None:
    """Re-draw every parameter from one seeded generator, in name order.

    transformers' init order is an implementation detail; drawing ourselves keeps the bytes
    stable. Std 0.1 (not 0.02) so tiny models have peaked, non-uniform attention to test on.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("weight") and "norm" in name.rsplit(".", 2)[-2]:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _normalise_json_files(folder: Path) -> None:
    """Sort keys of the JSON files we write so byte-identity does not hang on dict order."""
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
