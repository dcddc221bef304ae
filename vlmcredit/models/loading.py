"""Load a Qwen-VL checkpoint (model + processor) from a folder or the local hub cache.

One function, `load_checkpoint`, serves the 7B user and the tiny test model alike. Before any
heavy import it checks the folder (config, weights, tokenizer) so that a wrong path or a
text-only checkpoint fails in a second with a one-line message instead of a stack trace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.builtin import builtin_path, is_builtin
from vlmcredit.models.families import FamilyAdapter, ModelGeometry, adapter_for

DTYPES = ("auto", "bf16", "fp16", "fp32")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedCheckpoint:
    """A model ready for probing, with everything needed to interpret its tokens."""

    model: Any
    processor: Any
    adapter: FamilyAdapter
    geometry: ModelGeometry
    source: str  # what the user passed (folder or hub id)
    path: Path  # the resolved local folder

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def config(self) -> Any:
        return self.model.config

    def decoder_layers(self) -> Any:
        return self.adapter.decoder_layers(self.model)


def resolve_checkpoint(ckpt: str | os.PathLike[str]) -> Path:
    """A local folder for `ckpt`: the folder itself, or a hub id's snapshot in the local cache.

    Never downloads: vlmcredit runs offline; a hub id must already be in the cache.
    `builtin:NAME` names a checkpoint shipped in the package (`models.builtin`).
    """
    if is_builtin(str(ckpt)):
        return builtin_path(str(ckpt))
    path = Path(ckpt).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VlmCreditError(f"--ckpt {ckpt}: is a file; pass the checkpoint folder")
        # absolute: manifests record this path, and a relative one means nothing elsewhere
        return path.absolute()
    text = str(ckpt)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise VlmCreditError(f"--ckpt {ckpt}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # the hub raises several types for "not cached"
        raise VlmCreditError(
            f"--ckpt {ckpt}: not a folder and not in the local Hugging Face cache "
            f"({type(exc).__name__}); download it first (hf download {ckpt}) or pass a folder"
        ) from None


def read_model_type(folder: Path, source: str) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VlmCreditError(
            f"--ckpt {source}: no config.json in {folder}; is this a checkpoint folder?"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"--ckpt {source}: config.json is not valid JSON ({exc})") from None
    return str(config.get("model_type"))


def check_checkpoint_files(folder: Path, source: str) -> None:
    """Weights must be safetensors; a tokenizer must be present."""
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise VlmCreditError(
                f"--ckpt {source}: only pickle weights ({pickled[0]}); vlmcredit loads safetensors "
                "only: convert the checkpoint to safetensors first"
            )
        raise VlmCreditError(f"--ckpt {source}: no *.safetensors weights in {folder}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise VlmCreditError(
            f"--ckpt {source}: no tokenizer (tokenizer.json or vocab.json) in {folder}; "
            "copy the tokenizer files from the base model"
        )
    for path in sorted(folder.glob("*.safetensors")):
        read_safetensors_header(path, f"--ckpt {source}")


_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


def read_safetensors_header(path: Path, source: str = "") -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size.

    A truncated download or a corrupt file fails here with one line, before the loader would
    fail deep inside (or allocate what a garbage length field asks for).
    """
    where = f"{source}: {path.name}" if source else str(path)
    advice = "re-download or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VlmCreditError(f"{where}: not a safetensors file (too short); {advice}")
            header_len = int.from_bytes(head, "little")
            if header_len > min(_MAX_HEADER, size - 8):
                raise VlmCreditError(
                    f"{where}: not a complete safetensors file (header of {header_len} bytes in a "
                    f"{size}-byte file); {advice}"
                )
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        raise VlmCreditError(
            f"{where}: not a readable safetensors file ({exc}); {advice}"
        ) from None
    if not isinstance(header, dict):
        raise VlmCreditError(f"{where}: safetensors header is not a JSON object; {advice}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise VlmCreditError(
                f"{where}: tensor {name!r} has no valid data_offsets; {advice}"
            ) from None
    if 8 + header_len + end > size:
        raise VlmCreditError(
            f"{where}: truncated ({size} bytes, the header describes {8 + header_len + end}); "
            f"{advice}"
        )
    return header


def torch_dtype(dtype: str) -> Any:
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": "auto"}
    if dtype not in table:
        raise VlmCreditError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return table[dtype]


def load_processor(folder: Path, adapter: FamilyAdapter, trust_remote_code: bool = False) -> Any:
    """The family's processor; built from its parts when the video processor cannot load.

    Without a working torchvision (CPU machines here), `AutoProcessor` fails on the video
    processor that Qwen processors declare. We only need tokenizer + image processor, so we
    build the processor class with `video_processor=None` (its type check is relaxed for that).
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ImportError:
        pass  # torchvision missing: fall back below
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    chat_template = None
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text()
    elif getattr(tokenizer, "chat_template", None):
        chat_template = tokenizer.chat_template
    base = getattr(transformers, adapter.processor_class)
    return _processor_without_video(base)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


_FALLBACK_CLASSES: dict[type, type] = {}


def _processor_without_video(base: type) -> type:
    """A subclass of `base` that accepts `video_processor=None` (images-only use)."""
    if base not in _FALLBACK_CLASSES:

        def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
            if argument is None and "video" in argument_name:
                return None
            return base.check_argument_for_proper_class(self, argument_name, argument)

        _FALLBACK_CLASSES[base] = type(
            base.__name__,
            (base,),
            {"check_argument_for_proper_class": check_argument_for_proper_class},
        )
    return _FALLBACK_CLASSES[base]


def check_device(device: str | None) -> None:
    """A device this machine has, or one line saying which it lacks."""
    if not device:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise VlmCreditError(
            f"--device {device}: not a device name (e.g. cpu, cuda, cuda:1)"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise VlmCreditError(
                f"--device {device}: this machine has no CUDA GPU visible to torch "
                f"({torch.__version__}); omit --device to run on CPU, or install a CUDA torch"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise VlmCreditError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise VlmCreditError(f"--device {device}: device type {parsed.type!r} is not supported")
    elif parsed.type != "cpu" and not getattr(torch, parsed.type).is_available():
        raise VlmCreditError(f"--device {device}: not available on this machine")


def check_tokenizer(tokenizer: Any, geometry: ModelGeometry, source: str) -> None:
    """A tokenizer with more tokens than the model's vocabulary is another checkpoint's: its
    ids would index past the embedding table (an IndexError deep inside the forward)."""
    size = len(tokenizer)
    if size > geometry.vocab_size:
        raise VlmCreditError(
            f"--ckpt {source}: the tokenizer has {size} tokens but the model's vocabulary only "
            f"{geometry.vocab_size}; the tokenizer files belong to another checkpoint (copy this "
            "model's own tokenizer files)"
        )


def load_checkpoint(
    ckpt: str | os.PathLike[str],
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedCheckpoint:
    """Load model + processor of a supported Qwen-VL checkpoint, in eval mode.

    `device_map` (e.g. "auto") shards across GPUs as transformers does and excludes `device`.
    Weights load from safetensors only; a checkpoint's own code runs only on explicit request.
    """
    if device and device_map:
        raise VlmCreditError("--device and --device-map exclude each other; pass one of them")
    check_device(device)
    folder = resolve_checkpoint(ckpt)
    source = str(ckpt)
    model_type = read_model_type(folder, source)
    adapter = adapter_for(model_type, f"--ckpt {source}")
    check_checkpoint_files(folder, source)
    torch_dt = torch_dtype(dtype)

    from transformers import AutoModelForImageTextToText

    processor = load_processor(folder, adapter, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder,
            dtype=torch_dt,
            device_map=device_map,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
        )
    except RuntimeError as exc:
        # transformers' shape report: the weights were saved for another config
        if "mismatched" not in str(exc):
            raise
        raise VlmCreditError(
            f"--ckpt {source}: the weights' shapes do not match config.json (another "
            "checkpoint's config?); restore the checkpoint's own config.json"
        ) from None
    if device and not device_map:
        model.to(device)
    model.eval()
    geometry = ModelGeometry.from_config(model.config, f"--ckpt {source}")
    check_tokenizer(processor.tokenizer, geometry, source)
    return LoadedCheckpoint(model, processor, adapter, geometry, source, folder)
