"""Guards that make a torch / transformers upgrade fail loudly instead of degrading silently.

- The capture's fast path (each row's log-sum-exp from the fused CPU attention kernel) must
  really be taken on the CPU torch we test with, not quietly replaced by the portable fallback.
- The shared-prefix KV path of MME answering must use the cache names of the installed
  transformers (5.24 renamed `past_key_values` to `cache`), neither as a FutureWarning (which
  pyproject's filterwarnings turns into an error) nor as a logged deprecation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import noise_image
from vlmcredit.data.mme import read_mme
from vlmcredit.data.mme_synth import write_synthetic_mme
from vlmcredit.data.sample import Sample
from vlmcredit.models.families import adapter_of
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.capture import CaptureSpec, capture_session
from vlmcredit.probes.mme_answer import ImageFeatureCache, MMEInputs
from vlmcredit.probes.response_attention import row_targets

FUSED_CPU_KERNEL = "_scaled_dot_product_flash_attention_for_cpu"


def capture_counts(ck, samples, kernel_lse: bool, grad: bool = False):
    """One teacher-forced forward under capture: (attention per row, kernel calls, fallbacks)."""
    batch = encode_samples(ck.processor, ck.geometry, samples)
    inputs = adapter_of(ck.model).with_positions(ck.model, batch.inputs)
    spec = CaptureSpec(kernel_lse=kernel_lse)
    with (
        torch.set_grad_enabled(grad),
        capture_session(ck.model, spec, row_targets(batch.layouts, "cpu")) as session,
    ):
        logits = ck.model(**inputs).logits
    assert logits.requires_grad == grad  # under grad the forward keeps its graph
    attention = [session.result(b).attention for b in range(len(samples))]
    return attention, session.kernel_lse_calls, session.recomputed_lse_calls


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_fused_lse_kernel_is_taken_on_cpu(loaded, family, padded) -> None:
    assert hasattr(torch.ops.aten, FUSED_CPU_KERNEL), (
        f"torch {torch.__version__} has no aten.{FUSED_CPU_KERNEL}: the capture now always "
        "recomputes full rows (slower); check the kernel's new name/signature"
    )
    ck = loaded(family)
    samples = [Sample([noise_image(84, 112, 7)], "What is it?", "Noise, in many colours.")]
    if padded:
        samples.append(Sample([noise_image(56, 56, 8)], "Describe the tiny one.", "Dots."))
    layers = ck.model.config.text_config.num_hidden_layers
    fast, kernel_calls, fallbacks = capture_counts(ck, samples, kernel_lse=True)
    assert (kernel_calls, fallbacks) == (layers, 0)  # every layer took the fused kernel
    slow, kernel_calls, fallbacks = capture_counts(ck, samples, kernel_lse=False)
    assert (kernel_calls, fallbacks) == (0, layers)
    for a, b in zip(fast, slow, strict=True):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-5, rtol=0)  # both paths: the same probabilities


def test_fused_lse_kernel_steps_aside_under_grad(loaded) -> None:
    """With autograd on, the direct kernel call (no graph) must not produce the layer output:
    plain SDPA runs, gradients flow, and the captured numbers are the same."""
    ck = loaded("qwen2-vl")
    samples = [Sample([noise_image(84, 84, 9)], "Colour?", "Many colours at once.")]
    layers = ck.model.config.text_config.num_hidden_layers
    with_grad, kernel_calls, fallbacks = capture_counts(ck, samples, True, grad=True)
    assert (kernel_calls, fallbacks) == (0, layers)
    without, kernel_calls, _ = capture_counts(ck, samples, True)
    assert kernel_calls == layers
    assert torch.allclose(with_grad[0], without[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mme_pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mme-guard") / "synth"
    write_synthetic_mme(path, 2, seed=3, categories=["existence", "count"])
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_shared_prefix_kv_path_uses_current_cache_names(loaded, mme_pairs, family) -> None:
    from transformers.utils import logging as hf_logging

    ck = loaded(family)
    bank = MMEInputs(ck, read_mme(mme_pairs).questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    batch = bank.batches(4)[0]
    assert any(len(members) > 1 for members, _ in bank.prefix_groups(batch))  # a shared prefix
    records = _Records()
    root = hf_logging.get_logger()  # transformers' library root logger
    verbosity = hf_logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()  # a message logged earlier must show again
    root.addHandler(records)
    hf_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            logits = bank.shared_prefix_logits(batch)
    finally:
        hf_logging.set_verbosity(verbosity)
        root.removeHandler(records)
    assert logits.shape == (len(batch), ck.model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    deprecated = [m for m in records.messages if "deprecated" in m.lower()]
    assert deprecated == []
