"""TRL adapter: a `GRPOTrainer` whose advantages are multiplied by per-token weights.

TRL's loss accepts (B, T) advantages (it unsqueezes only 1-D ones), so the weights enter by
replacing `advantages` with `advantages[:, None] * weights` right after TRL has generated,
scored and normalised a batch; the surrogate and its aggregation then run unchanged. Loss
configurations where that does not scale each token's gradient by its weight (beta > 0, a
sequence-level ratio, the entropy bonus; the table in `trl_modes`) are refused at construction.

Weights come from a signals file (replayed rollouts, e.g. recorded with `record_rollouts`:
looked up by the dataset's sample id and the completion's exact token ids) or from a callable
for fresh rollouts (`weights_fn(model, batch)`, e.g. `vlmcredit.online.weights`). A completion
with no signals row stops training with an error naming it (`on_miss="error"`, the default);
`on_miss="keep"` trains it at weight 1, `"drop"` at weight 0. Every step logs
`vlmcredit/match_rate`, `vlmcredit/rows_found`, `vlmcredit/rows_missed` and
`vlmcredit/tokens_missed` (replay) or `vlmcredit/rows_text_only` (online: rows without image
tokens, which `online.weights` leaves at weight 1).

A signals file whose loss denominator is the selected tokens restricts TRL's loss mask to them
(through TRL's own `tool_mask`, which multiplies into the mask every loss type normalises by).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from vlmcredit.errors import VlmCreditError
from vlmcredit.export.trl_modes import refusal
from vlmcredit.export.trl_rollouts import RolloutRecorder
from vlmcredit.formats.provenance import tokenizer_hash
from vlmcredit.formats.signals import LOSS_DENOMINATORS, ON_MISS, Signals, read_signals

WeightsFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]
# Loss types that divide by a constant (not by the masked token count) cannot average over the
# selected tokens only.
_CONSTANT_DENOMINATOR_LOSSES = ("dr_grpo", "luspo")
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


class VlmCreditGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with vlmcredit's per-token advantage weights.

    Pass one of `signals` (a signals folder/file or a loaded `Signals`) or `weights_fn`, or
    neither with `record_rollouts` (plain GRPO that records its rollouts). `sample_id_column`
    names the dataset column holding the rollout id. `on_miss` ("error", "keep", "drop") says
    what a replayed completion without a signals row gets. `loss_denominator` overrides the
    signals manifest's (default for a `weights_fn`: all_tokens). `record_rollouts` writes every
    training batch's rollouts (advantages before weighting) to that JSONL file. All other
    arguments are GRPOTrainer's.
    """

    def __init__(
        self,
        *args: Any,
        signals: str | os.PathLike[str] | Signals | None = None,
        weights_fn: WeightsFn | None = None,
        sample_id_column: str = "sample_id",
        loss_denominator: str | None = None,
        on_miss: str = "error",
        record_rollouts: str | os.PathLike[str] | None = None,
        piggyback: bool = True,
        **kwargs: Any,
    ) -> None:
        if signals is not None and weights_fn is not None:
            raise VlmCreditError("VlmCreditGRPOTrainer: pass signals or weights_fn, not both")
        if signals is None and weights_fn is None and record_rollouts is None:
            raise VlmCreditError(
                "VlmCreditGRPOTrainer: pass exactly one of signals or weights_fn (or "
                "record_rollouts alone to record a plain GRPO run)"
            )
        if on_miss not in ON_MISS:
            raise VlmCreditError(f"on_miss {on_miss!r}: choose one of {', '.join(ON_MISS)}")
        self.weighting = signals is not None or weights_fn is not None
        # Refused before TRL builds anything (a beta > 0 trainer would load a reference model).
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if self.weighting and config is not None:
            reason = refusal(
                config.loss_type,
                config.importance_sampling_level,
                config.beta,
                config.entropy_coef,
                config.use_adaptive_entropy,
            )
            if reason is not None:
                raise VlmCreditError(f"VlmCreditGRPOTrainer: {reason}")
        super().__init__(*args, **kwargs)
        self.weights_fn = weights_fn
        self.sample_id_column = sample_id_column
        self.on_miss = on_miss
        self.signals: Signals | None = None
        if signals is not None:
            tok_sha1 = tokenizer_hash(self.processing_class)
            tokenizer = getattr(self.processing_class, "tokenizer", None) or self.processing_class
            if isinstance(signals, Signals):
                if signals.meta["tokenizer_sha1"] != tok_sha1:
                    raise VlmCreditError(
                        f"{signals.source or 'signals'}: written for tokenizer "
                        f"{signals.meta['tokenizer_sha1'][:12]}, but the trainer's tokenizer is "
                        f"{tok_sha1[:12]}; compute the signals with the trainer's checkpoint"
                    )
                self.signals = signals
            else:
                self.signals = read_signals(Path(signals), tok_sha1, len(tokenizer))
            columns = getattr(self.train_dataset, "column_names", None)
            if columns is not None and self.sample_id_column not in columns:
                raise VlmCreditError(
                    f"train_dataset has no {self.sample_id_column!r} column; add the rollout ids "
                    "the signals were exported with (or pass sample_id_column=...)"
                )
        denominator = loss_denominator or (
            self.signals.loss_denominator
            if self.signals is not None
            else getattr(weights_fn, "loss_denominator", None) or "all_tokens"
        )
        if denominator not in LOSS_DENOMINATORS:
            raise VlmCreditError(
                f"loss_denominator {denominator!r}: choose one of {', '.join(LOSS_DENOMINATORS)}"
            )
        if denominator == "selected_tokens" and self.loss_type in _CONSTANT_DENOMINATOR_LOSSES:
            raise VlmCreditError(
                f"the signals average the loss over selected tokens, but loss_type "
                f"{self.loss_type!r} divides by a constant; use grpo, bnpo or dapo (or pass "
                "loss_denominator='all_tokens')"
            )
        self.loss_denominator = denominator
        self.signal_misses = {"rows": 0, "tokens": 0}
        self.rows_text_only = 0
        # Capture in TRL's own no-grad old-log-prob forward when it runs one and the weights_fn
        # can (`online.weights_fn(...)` of an attention-only method); counted per step.
        self.piggyback = bool(piggyback) and bool(getattr(weights_fn, "can_piggyback", False))
        self.piggyback_steps = {"captured": 0, "extra_forward": 0}
        self.type_ids_fixed = 0
        self._armed = False
        self._capture: Any = None
        self.recorder: RolloutRecorder | None = None
        if record_rollouts is not None:
            recorder = RolloutRecorder(record_rollouts, sample_id_column)
            self.recorder = recorder.attach(self, wrap_generation=False)

    # The one TRL method we extend: it returns the batch the loss consumes.
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._armed, self._capture = self.piggyback, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._armed = False
        if self.recorder is not None:
            self.recorder.record(self, inputs, output)
        if not self.weighting:
            return output
        completion_ids = output["completion_ids"]
        completion_mask = output["completion_mask"]
        if self.signals is not None:
            weights, selected = self._replayed_weights(inputs, completion_ids, completion_mask)
        else:
            weights = self._online_weights(output)
            selected = weights != 0
        # How much of the batch the weights keep: the share of completion tokens selected and
        # their mean weight (a weighting that quietly selects nothing shows here first).
        real = completion_mask.bool()
        counts = torch.stack(
            [
                real.sum(),
                (selected.to(real.device) & real).sum(),
                (weights.to(real.device).float() * real).sum(),
            ]
        ).float()
        total, chosen, weight_sum = self.accelerator.gather(counts.view(1, 3)).view(-1, 3).sum(0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["vlmcredit/selected_share"].append(
            (chosen / total).item() if total else 0.0
        )
        self._metrics[mode]["vlmcredit/mean_weight"].append(
            (weight_sum / total).item() if total else 0.0
        )
        advantages = output["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        output["advantages"] = advantages * weights.to(advantages.device, advantages.dtype)
        if self.loss_denominator == "selected_tokens":
            tool_mask = output.get("tool_mask")
            keep = selected.to(completion_mask.device, completion_mask.dtype)
            tool_mask = keep if tool_mask is None else tool_mask * keep
            output["tool_mask"] = tool_mask
            # dapo/cispo/vespo normalise by this count, computed by TRL before our mask existed.
            output["num_items_in_batch"] = self.accelerator.gather(
                (completion_mask * tool_mask).sum()
            ).sum()
        return output

    def _replayed_weights(
        self, inputs: list[dict[str, Any]], completion_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.signals is not None
        try:
            sample_ids = [str(x[self.sample_id_column]) for x in inputs]
        except KeyError:
            raise VlmCreditError(
                f"a training example has no {self.sample_id_column!r}; every row needs its "
                "rollout id"
            ) from None
        found = self.signals.batch_weights(
            sample_ids, completion_ids.cpu(), mask.cpu(), on_miss=self.on_miss
        )
        counts = torch.tensor(
            [found.rows_missed, found.tokens_missed, found.rows_found],
            dtype=torch.float32,
            device=self.accelerator.device,
        )
        missed_rows, missed_tokens, rows_found = self.accelerator.gather(counts).view(-1, 3).sum(0)
        self.signal_misses["rows"] += found.rows_missed
        self.signal_misses["tokens"] += found.tokens_missed
        mode = "train" if self.model.training else "eval"
        total = (rows_found + missed_rows).item()
        self._metrics[mode]["vlmcredit/match_rate"].append(
            rows_found.item() / total if total else 1.0
        )
        self._metrics[mode]["vlmcredit/rows_missed"].append(missed_rows.item())
        self._metrics[mode]["vlmcredit/tokens_missed"].append(missed_tokens.item())
        self._metrics[mode]["vlmcredit/rows_found"].append(rows_found.item())
        device = completion_ids.device
        return found.weights.to(device), found.selected.to(device)

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        kwargs = self._rebuilt_type_ids(input_ids, logits_to_keep, kwargs)
        if not (self._armed and not torch.is_grad_enabled()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # TRL's old-log-prob forward over this batch's prompt + completion: capture in it.
        self._armed = False
        assert self.weights_fn is not None
        unwrapped = self.accelerator.unwrap_model(self.model)
        with self.weights_fn.piggyback(unwrapped, logits_to_keep) as capture:  # type: ignore[attr-defined]
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._capture = capture
        return out

    def _rebuilt_type_ids(
        self, input_ids: torch.Tensor, completion_width: int, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """`mm_token_type_ids` rebuilt from the ids. TRL takes them from the processor, which
        pads on its own side, while it pads the prompt ids on the left: with a right-padding
        processor they are shifted on the padded rows and M-RoPE gets wrong image positions.
        Applied to every forward of the trainer (old log-probs and the loss alike), and counted
        (`vlmcredit/type_ids_fixed`), only when weighting and images are present."""
        given = kwargs.get("mm_token_type_ids")
        image_id = getattr(self, "_image_pad_token_id", None)
        if not self.weighting or given is None or image_id is None:
            return kwargs
        if kwargs.get("pixel_values") is None:  # TRL dropped the images (truncation)
            return kwargs
        prompt = input_ids[:, : input_ids.shape[1] - completion_width]
        rebuilt = torch.zeros_like(input_ids, dtype=given.dtype)
        rebuilt[:, : prompt.shape[1]][prompt == image_id] = 1
        video_id = getattr(self, "_video_pad_token_id", None)
        if video_id is not None:
            rebuilt[:, : prompt.shape[1]][prompt == video_id] = 2
        if rebuilt.shape == given.shape and torch.equal(rebuilt, given.to(rebuilt.device)):
            return kwargs
        if torch.is_grad_enabled():  # count each batch once (its loss forward)
            self.type_ids_fixed += int((rebuilt != given.to(rebuilt.device)).any(dim=1).sum())
        return {**kwargs, "mm_token_type_ids": rebuilt}

    def _online_weights(self, output: Mapping[str, Any]) -> torch.Tensor:
        assert self.weights_fn is not None
        batch = {
            "input_ids": torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
            "attention_mask": torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
            "response_mask": output["completion_mask"],
        }
        batch.update({k: output[k] for k in _FORWARD_KEYS if k in output})
        model = self.accelerator.unwrap_model(self.model)
        mode = "train" if self.model.training else "eval"
        # Rows without image tokens (text-only prompts of a mixed dataset): online.weights
        # leaves them at weight 1; counted here whatever the weights_fn.
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is not None:
            text_only = (~(output["prompt_ids"] == image_token_id).any(dim=1)).sum()
            text_only = self.accelerator.gather(text_only.reshape(1)).sum().item()
            self.rows_text_only += int(text_only)
            self._metrics[mode]["vlmcredit/rows_text_only"].append(float(text_only))
        capture, self._capture = self._capture, None
        self.piggyback_steps["captured" if capture is not None else "extra_forward"] += 1
        self._metrics[mode]["vlmcredit/piggyback"].append(float(capture is not None))
        with torch.no_grad():
            if capture is not None:
                weights = self.weights_fn.from_capture(model, batch, capture)  # type: ignore[attr-defined]
            else:
                weights = self.weights_fn(model, batch)
        expected = tuple(output["completion_ids"].shape)
        if tuple(weights.shape) != expected:
            raise VlmCreditError(
                f"weights_fn returned shape {tuple(weights.shape)}; expected (batch, completion "
                f"length) = {expected}"
            )
        return weights.detach().float()
