"""Online weights captured inside TRL's own old-log-prob forward (piggyback), in real GRPO steps.

With `num_iterations > 1` TRL runs a no-grad forward of the policy over prompt + completion to
score the old log-probabilities. `online.weights_fn("anchors")` captures the attention in that
forward instead of running one more. Checked here, on a tiny Qwen2.5-VL, prompts of different
lengths (so the prompt block is padded) and processors padding on either side:
- the step captured in TRL's forward (no extra forward ran) and says so in its metrics;
- the attention captured there equals the extra-forward path's (which rebuilds image positions
  from the ids), and so do the weights, whichever side the processor pads;
- each token's gradient is its weight times the plain GRPO gradient of the same step;
- without the old-log-prob forward (num_iterations 1) the extra forward runs, counted;
- under bf16 autocast (TRL's default `bf16=True`, which the steps above run with too) the
  captured attention is within bf16 rounding of an fp32 capture on the same weights.
(A text-only row and a trainer that scores in chunks: tests/test_online.py.)
"""

from __future__ import annotations

import pytest
import torch

from tests.export.test_trl import train_one_step
from vlmcredit.errors import VlmCreditError


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    from datasets import Dataset

    from tests.helpers import noise_image

    ckpt = tiny_ckpt("qwen2.5-vl")
    questions = ["What color is the circle?", "Is there a red square in the top left corner?"]
    rows = [
        {
            "sample_id": f"img-{i}",
            "prompt": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
            ],
            "image": noise_image(56 + 28 * i, 56, i),
            "answer": a,
        }
        for i, (q, a) in enumerate(zip(questions, ["red", "yes"], strict=True))
    ]
    return {"ckpt": ckpt, "dataset": Dataset.from_list(rows), "root": tmp_path_factory.mktemp("pb")}


def processor(ckpt, side: str):
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor

    proc = load_processor(ckpt, adapter_for("qwen2_5_vl", "test"))
    proc.tokenizer.padding_side = side
    return proc


class Recording:
    """An `online.weights_fn` that also computes the extra-forward weights of the same batch
    at the same moment (the reference) and keeps both."""

    def __init__(self, inner, reference_model=None) -> None:
        self.inner = inner
        # The model the reference capture runs on (default: the trainer's own policy).
        self.reference_model = reference_model
        self.can_piggyback = inner.can_piggyback
        self.loss_denominator = inner.loss_denominator
        self.seen: list[dict] = []

    def piggyback(self, model, width):
        return self.inner.piggyback(model, width)

    def from_capture(self, model, batch, capture):
        from vlmcredit.probes.response_attention import capture_batch_attention

        w = self.inner.from_capture(model, batch, capture)
        self.seen.append(
            {
                "mode": "piggyback",
                "weights": w.clone(),
                "reference": self.inner(model, batch).clone(),
                "rows": capture.rows,
                "reference_rows": capture_batch_attention(self.reference_model or model, batch),
                "completions": batch["input_ids"][:, -batch["response_mask"].shape[1] :].clone(),
            }
        )
        return w

    def __call__(self, model, batch):
        w = self.inner(model, batch)
        self.seen.append({"mode": "extra", "weights": w.clone()})
        return w


def run_step(setup, side: str, trainer_cls, name: str, num_iterations: int, **extra) -> dict:
    """One GRPO step (test_trl's harness) with this processor padding side and num_iterations."""
    run_setup = {**setup, "processor": processor(setup["ckpt"], side)}
    args = {"num_iterations": num_iterations}
    return train_one_step(run_setup, trainer_cls, f"{name}-{side}", args=args, **extra)


@pytest.mark.parametrize("side", ["left", "right"])
def test_piggyback_capture_equals_the_extra_forward_and_scales_gradients(setup, side) -> None:
    from trl import GRPOTrainer

    from vlmcredit import online
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    fn = Recording(online.weights_fn("anchors"))
    assert fn.loss_denominator == "selected_tokens"  # AT-RL: train on the anchors only
    # all_tokens here, so that each token's gradient is exactly w x the plain one (the
    # selected-token denominator is tested in test_trl.py).
    run = run_step(
        setup, side, VlmCreditGRPOTrainer, "pb", 2, weights_fn=fn, loss_denominator="all_tokens"
    )
    trainer = run["trainer"]
    assert trainer.piggyback_steps == {"captured": 1, "extra_forward": 0}
    assert run["logs"]["vlmcredit/piggyback"] == 1.0
    ((seen,),) = [[s for s in fn.seen if s["mode"] == "piggyback"]]
    assert not [s for s in fn.seen if s["mode"] == "extra"]
    # The prompt block is padded (different prompt lengths), and a right-padding processor's
    # type ids were rebuilt in TRL's forwards; then the captured attention is the reference's.
    assert (trainer.type_ids_fixed > 0) == (side == "right")
    for got, ref in zip(seen["rows"], seen["reference_rows"], strict=True):
        assert got is not None and ref is not None
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    w = seen["weights"]
    assert torch.equal(w, seen["reference"])
    assert set(w.unique().tolist()) == {0.0, 1.0}
    # Logged: the share of completion tokens selected and their mean weight (0/1: equal).
    share = run["logs"]["vlmcredit/selected_share"]
    assert 0.0 < share < 1.0 and run["logs"]["vlmcredit/mean_weight"] == pytest.approx(share)
    # Each token's gradient = its weight x the plain GRPO gradient of the same step.
    plain = run_step(setup, side, GRPOTrainer, "plain", 2)
    by_tokens = {tuple(c.tolist()): row for c, row in zip(seen["completions"], w, strict=True)}
    w_loss = torch.stack([by_tokens[tuple(c.tolist())] for c in run["loss_completions"]])
    assert torch.equal(run["loss_completions"], plain["loss_completions"])
    assert torch.equal(run["grad_logp"], w_loss * plain["grad_logp"])


def test_without_trl_forward_the_extra_forward_runs_and_is_counted(setup) -> None:
    from vlmcredit import online
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    fn = Recording(online.weights_fn("anchors"))
    run = run_step(setup, "left", VlmCreditGRPOTrainer, "extra", 1, weights_fn=fn)
    assert run["trainer"].piggyback_steps == {"captured": 0, "extra_forward": 1}
    assert run["logs"]["vlmcredit/piggyback"] == 0.0
    assert [s["mode"] for s in fn.seen] == ["extra"]


def test_methods_that_read_more_than_attention_cannot_piggyback() -> None:
    from vlmcredit import online

    assert online.weights_fn("anchors").can_piggyback
    assert not online.weights_fn("entropy").can_piggyback
    with pytest.raises(VlmCreditError, match="reads"):
        online.weights_fn("entropy").piggyback(object(), 4)
    with pytest.raises(VlmCreditError, match="config="):
        online.weights(object(), {}, method="kawhi", heads="all")


def test_piggyback_under_bf16_autocast_matches_an_fp32_reference(setup) -> None:
    """Users train in bf16: TRL's forwards then run under autocast (accelerate wraps the
    policy's forward itself). The attention captured in TRL's old-log-prob forward stays within
    bf16 rounding of an fp32 capture of the same batch on the same weights (the checkpoint
    loaded again without the trainer: the first step's policy), median relative error < 1%."""
    from transformers import AutoModelForImageTextToText

    from vlmcredit import online
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    fp32 = AutoModelForImageTextToText.from_pretrained(
        setup["ckpt"], dtype=torch.float32, attn_implementation="sdpa"
    )
    fn = Recording(online.weights_fn("anchors"), reference_model=fp32)
    run_setup = {**setup, "processor": processor(setup["ckpt"], "left")}
    run = train_one_step(
        run_setup,
        VlmCreditGRPOTrainer,
        "bf16",
        args={"num_iterations": 2, "bf16": True},
        weights_fn=fn,
    )
    assert run["trainer"].piggyback_steps == {"captured": 1, "extra_forward": 0}
    ((seen,),) = [[s for s in fn.seen if s["mode"] == "piggyback"]]
    errors = []
    for got, ref in zip(seen["rows"], seen["reference_rows"], strict=True):
        assert torch.isfinite(got).all()
        errors.append(((got - ref).abs() / ref.abs().clamp_min(1e-6)).flatten())
    median = torch.cat(errors).median().item()
    assert 0.0 < median < 1e-2, median  # > 0: the capture really ran in bf16
