"""VERL adapter: multiply vlmcredit's per-token weights into the advantages before the update.

Where the weights go in: VERL's registries (`register_policy_loss`, `register_adv_est`) hand
their functions tensors only (log-probs, advantages, response_mask, rewards, group uid), never
the sample ids or response token ids a replayed signals file is keyed by. The batch with
`responses` and `extra_info` exists on the driver at the advantage step, so that is where the
weights are applied: after VERL's own advantage estimator, `advantages *= weights` (and, for
signals whose loss denominator is the selected tokens, `response_mask &= selected`, and in the
v1 trainer `loss_mask` too, the mask VERL's engine counts the token-mean denominator from). For
weights >= 0 that scales each token's term exactly in the policy losses and aggregations listed
in `verl_support.POLICY_LOSSES`; the others are refused when the trainer is built
(`check_actor_config`), as are KL-loss and entropy terms, which the weights do not reach.

- verl 0.9 (`trainer.use_v1=True`, the default): `register_trainer()` registers the trainer
  mode "vlmcredit" (a subclass of the "sync" trainer whose `_compute_advantage` applies the
  weights). Config: `trainer.v1.trainer_mode=vlmcredit +vlmcredit.signals=PATH`.
- verl 0.8 (and 0.9 with `trainer.use_v1=False`): `install_legacy_hook(weighting)` wraps
  `verl.trainer.ppo.ray_trainer.compute_advantage`, which the legacy trainer's `fit` calls.

Importing this module inside VERL's processes (`VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl`)
performs the registration (see `_register_on_import`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.export.verl_support import UNWEIGHTED_TERMS_OPTION, check_loss_config
from vlmcredit.formats.signals import LOSS_DENOMINATORS, Signals, read_signals

TRAINER_NAME = "vlmcredit"
CONFIG_KEY = "vlmcredit"  # +vlmcredit.signals=PATH [+vlmcredit.loss_denominator=...]
ENV_SIGNALS = "VLMCREDIT_SIGNALS"  # the legacy hook reads its signals path from here
ENV_DENOMINATOR = "VLMCREDIT_LOSS_DENOMINATOR"
ENV_UNWEIGHTED = "VLMCREDIT_ALLOW_UNWEIGHTED_TERMS"

log = logging.getLogger("vlmcredit.verl")

WeightsFn = Callable[[Mapping[str, Any]], Any]


def sample_ids_from_extra_info(extra_infos: Sequence[Any], key: str = "sample_id") -> list[str]:
    """The sample id of each row from VERL's per-row `extra_info` dicts."""
    ids = []
    for i, info in enumerate(extra_infos):
        if not isinstance(info, Mapping) or info.get(key) is None:
            raise VlmCreditError(
                f"VERL batch row {i}: extra_info has no {key!r}; put the rollout id in "
                f"extra_info.{key} of the training parquet (the id the signals were exported with)"
            )
        ids.append(str(info[key]))
    return ids


def weight_advantages(
    advantages: Any,
    response_mask: Any,
    weights: Any,
    selected: Any | None = None,
    loss_denominator: str = "all_tokens",
) -> tuple[Any, Any]:
    """(advantages * weights, loss mask): the mask keeps only selected tokens when the loss is
    averaged over selected tokens, so `agg_loss` divides by their count."""
    if loss_denominator not in LOSS_DENOMINATORS:
        raise VlmCreditError(
            f"loss_denominator {loss_denominator!r}: choose one of {', '.join(LOSS_DENOMINATORS)}"
        )
    if tuple(weights.shape) != tuple(advantages.shape):
        raise VlmCreditError(
            f"token weights of shape {tuple(weights.shape)} do not match the advantages "
            f"{tuple(advantages.shape)}; weights must be (batch, response length)"
        )
    weighted = advantages * weights.to(device=advantages.device, dtype=advantages.dtype)
    if loss_denominator == "all_tokens":
        return weighted, response_mask
    keep = (weights != 0) if selected is None else selected
    keep = keep.to(response_mask.device)
    if not bool((keep & response_mask.bool()).any()):
        # VERL divides the token-mean by the selected count: 0 / 0 would poison the update.
        raise VlmCreditError(
            "selected_tokens denominator: no response token of this batch is selected; use "
            "loss_denominator=all_tokens for signals that can select nothing"
        )
    chosen = keep & response_mask.bool()
    empty = int((response_mask.bool().any(dim=-1) & ~chosen.any(dim=-1)).sum())
    if empty:
        # Within a step that selects something, a PPO mini-batch made only of such rows gets
        # batch_num_tokens 0 in VERL's engine: its loss is 0 / 0 and VERL's own non-finite
        # grad-norm check skips that optimizer step ("WARN: grad_norm is not finite"), which is
        # the update those rows ask for (none). Said here, once per batch, not left to surprise.
        log.warning(
            "vlmcredit: %d of %d rows select no token (selected_tokens denominator); a PPO "
            "mini-batch of only such rows has a 0/0 loss in VERL, whose non-finite grad-norm "
            "check then skips its update",
            empty,
            int(response_mask.shape[0]),
        )
    if response_mask.dtype == keep.dtype:
        return weighted, response_mask & keep
    return weighted, response_mask * keep.to(response_mask.dtype)


def _get(config: Any, key: str, default: Any = None) -> Any:
    """`config.key` from an omegaconf node, a dict or a dataclass (VERL's ActorConfig)."""
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def check_actor_config(
    actor: Any, loss_denominator: str, allow_unweighted_terms: bool = False
) -> None:
    """Refuse an actor config (`actor_rollout_ref.actor`) whose loss does not apply the weights
    exactly: see `verl_support.POLICY_LOSSES` for which loss modes and aggregations do."""
    policy_loss = _get(actor, "policy_loss", {})
    check_loss_config(
        loss_mode=str(_get(policy_loss, "loss_mode", "vanilla")),
        loss_agg_mode=str(_get(actor, "loss_agg_mode", "token-mean")),
        loss_denominator=loss_denominator,
        use_kl_loss=bool(_get(actor, "use_kl_loss", False)),
        entropy_coeff=float(_get(actor, "entropy_coeff", 0.0)),
        allow_unweighted_terms=allow_unweighted_terms,
    )


@dataclass
class VerlWeighting:
    """Where the weights come from: a replayed signals file, or a callable for fresh rollouts.

    `weights_fn(batch)` gets {input_ids (B, P+T), attention_mask, response_mask (B, T),
    responses, and pixel_values / image_grid_thw when the batch has images} and returns (B, T)
    float weights; on VERL's driver it needs a model of its own (e.g.
    `functools.partial(vlmcredit.online.weights, scoring_model)`).

    `actor` (VERL's `actor_rollout_ref.actor` config) is checked at construction: a loss mode,
    aggregation or extra loss term the weights do not scale exactly is refused.
    """

    signals: Signals | None = None
    weights_fn: WeightsFn | None = None
    loss_denominator: str | None = None  # None: the signals manifest's, else all_tokens
    sample_id_key: str = "sample_id"
    actor: Any = None
    allow_unweighted_terms: bool = False

    def __post_init__(self) -> None:
        if (self.signals is None) == (self.weights_fn is None):
            raise VlmCreditError("VERL weighting: pass exactly one of signals or weights_fn")
        if self.loss_denominator is None:
            self.loss_denominator = (
                self.signals.loss_denominator if self.signals is not None else "all_tokens"
            )
        if self.loss_denominator not in LOSS_DENOMINATORS:
            raise VlmCreditError(
                f"loss_denominator {self.loss_denominator!r}: choose one of "
                f"{', '.join(LOSS_DENOMINATORS)}"
            )
        if self.actor is not None:
            check_actor_config(self.actor, self.loss_denominator, self.allow_unweighted_terms)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        tokenizer_sha1: str | None = None,
        loss_denominator: str | None = None,
        actor: Any = None,
        allow_unweighted_terms: bool = False,
    ) -> VerlWeighting:
        return cls(
            signals=read_signals(Path(path), tokenizer_sha1),
            loss_denominator=loss_denominator,
            actor=actor,
            allow_unweighted_terms=allow_unweighted_terms,
        )

    def apply(
        self,
        advantages: Any,
        response_mask: Any,
        responses: Any,
        sample_ids: Sequence[str] | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, dict[str, float]]:
        """Weighted advantages, the loss mask, and counters for the trainer's metrics."""
        import torch

        stats: dict[str, float] = {}
        if self.signals is not None:
            if sample_ids is None:
                raise VlmCreditError("VERL weighting from signals needs the batch's sample ids")
            found = self.signals.batch_weights(sample_ids, responses.cpu(), response_mask.cpu())
            weights, selected = found.weights, found.selected
            stats = {
                "vlmcredit/rows_found": float(found.rows_found),
                "vlmcredit/rows_missed": float(found.rows_missed),
                "vlmcredit/tokens_missed": float(found.tokens_missed),
            }
            if found.rows_missed:
                log.info(
                    "vlmcredit: %d of %d responses have no signals (weight 1 on %d tokens)",
                    found.rows_missed,
                    found.rows_missed + found.rows_found,
                    found.tokens_missed,
                )
        else:
            assert self.weights_fn is not None
            with torch.no_grad():
                weights = self.weights_fn(dict(batch or {}))
            weights = torch.as_tensor(weights, dtype=torch.float32)
            selected = weights != 0
        adv, mask = weight_advantages(
            advantages,
            response_mask,
            weights.to(advantages.device),
            selected.to(advantages.device),
            str(self.loss_denominator),
        )
        return adv, mask, stats


def _online_batch(data: Any) -> dict[str, Any]:
    """The batch a weights_fn receives, from a legacy DataProto."""
    import torch

    batch = {
        key: data.batch[key]
        for key in ("input_ids", "attention_mask", "response_mask", "responses")
        if key in data.batch.keys()  # noqa: SIM118  (TensorDict has no `in`)
    }
    mm = data.non_tensor_batch.get("multi_modal_inputs")
    if mm is not None:
        rows = [r for r in mm if r]
        for key in ("pixel_values", "image_grid_thw"):
            parts = [r[key] for r in rows if key in r]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
    return batch


def weight_dataproto(data: Any, weighting: VerlWeighting) -> dict[str, float]:
    """Apply the weights to a legacy VERL `DataProto` in place (after its advantages exist).

    Reads `batch["responses"]`, `batch["response_mask"]`, `batch["advantages"]` and
    `non_tensor_batch["extra_info"][i][sample_id_key]`; writes `advantages` and (selected-token
    denominator) `response_mask`. The counters also go to `meta_info["vlmcredit"]`.
    """
    batch = data.batch
    if "advantages" not in batch.keys():  # noqa: SIM118  (TensorDict has no `in`)
        raise VlmCreditError("VERL batch has no advantages yet; apply the weights after them")
    sample_ids = None
    if weighting.signals is not None:
        extra = data.non_tensor_batch.get("extra_info")
        if extra is None:
            raise VlmCreditError(
                "VERL batch has no extra_info; the training parquet must carry "
                f"extra_info.{weighting.sample_id_key} for replayed signals"
            )
        sample_ids = sample_ids_from_extra_info(list(extra), weighting.sample_id_key)
    adv, mask, stats = weighting.apply(
        batch["advantages"],
        batch["response_mask"],
        batch["responses"],
        sample_ids,
        _online_batch(data) if weighting.weights_fn is not None else None,
    )
    batch["advantages"] = adv
    batch["response_mask"] = mask
    if "loss_mask" in batch.keys():  # noqa: SIM118  (VERL's engine counts the denominator here)
        batch["loss_mask"] = mask
    data.meta_info.setdefault("vlmcredit", {}).update(stats)
    return stats


# -- registration in VERL -----------------------------------------------------------------------


def _verl_version() -> tuple[int, ...]:
    import verl

    return tuple(int(p) for p in str(verl.__version__).split(".")[:2] if p.isdigit())


def install_legacy_hook(weighting: VerlWeighting) -> None:
    """verl 0.8 (and 0.9 with trainer.use_v1=False): weight the advantages the legacy
    `RayPPOTrainer.fit` computes, by wrapping the module function it calls; `fit` first checks
    the actor config (`check_actor_config`) unless the weighting already did."""
    import verl.trainer.ppo.ray_trainer as ray_trainer

    if weighting.loss_denominator == "selected_tokens" and _verl_version() < (0, 9):
        raise VlmCreditError(
            "selected_tokens denominator on verl < 0.9: its actor divides each micro-batch by its "
            "own token count (a micro-batch without selected tokens gives NaN); use verl 0.9"
        )
    original = getattr(
        ray_trainer.compute_advantage, "__vlmcredit_original__", ray_trainer.compute_advantage
    )

    def compute_advantage(data: Any, *args: Any, **kwargs: Any) -> Any:
        data = original(data, *args, **kwargs)
        weight_dataproto(data, weighting)
        return data

    compute_advantage.__vlmcredit_original__ = original  # type: ignore[attr-defined]
    ray_trainer.compute_advantage = compute_advantage

    trainer_cls = ray_trainer.RayPPOTrainer
    fit = getattr(trainer_cls.fit, "__vlmcredit_original__", trainer_cls.fit)

    def checked_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        if weighting.actor is None:
            check_actor_config(
                self.config.actor_rollout_ref.actor,
                str(weighting.loss_denominator),
                weighting.allow_unweighted_terms,
            )
        return fit(self, *args, **kwargs)

    checked_fit.__vlmcredit_original__ = fit  # type: ignore[attr-defined]
    trainer_cls.fit = checked_fit


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _weighting_from_config(config: Any, tokenizer: Any = None) -> VerlWeighting:
    """The weighting a trainer config asks for (+vlmcredit.signals=PATH ...), its actor config
    checked; the tokenizer hash is checked when a tokenizer is given."""
    section = config.get(CONFIG_KEY) if hasattr(config, "get") else None
    path = (section or {}).get("signals") or os.environ.get(ENV_SIGNALS)
    if not path:
        raise VlmCreditError(
            f"trainer mode {TRAINER_NAME!r} needs the signals: add +{CONFIG_KEY}.signals=PATH "
            f"(or set {ENV_SIGNALS})"
        )
    denominator = (section or {}).get("loss_denominator") or os.environ.get(ENV_DENOMINATOR)
    allow = _truthy(
        (section or {}).get(UNWEIGHTED_TERMS_OPTION) or os.environ.get(ENV_UNWEIGHTED, "")
    )
    tok_sha1 = None
    if tokenizer is not None:
        from vlmcredit.formats.provenance import tokenizer_hash

        tok_sha1 = tokenizer_hash(tokenizer)
    actor = None
    if hasattr(config, "get") and config.get("actor_rollout_ref") is not None:
        actor = config.actor_rollout_ref.get("actor")
    return VerlWeighting.from_path(
        path,
        tokenizer_sha1=tok_sha1,
        loss_denominator=denominator,
        actor=actor,
        allow_unweighted_terms=allow,
    )


def register_trainer(name: str = TRAINER_NAME, base: str = "sync") -> type:
    """verl 0.9: register trainer mode `name`, the `base` v1 trainer with weighted advantages.

    Replays a signals file (keyed by extra_info.sample_id) given as +vlmcredit.signals=PATH;
    the signals and the actor's loss config are checked when the trainer is built. Registering
    the same name again returns the class already registered; any other failure raises.
    """
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.protocol import DataProto
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1 import register_trainer as verl_register_trainer
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    from verl.workers.utils.padding import response_to_nested

    existing = TRAINER_REGISTRY.get(name)
    if existing is not None and getattr(existing, "__vlmcredit_base__", None) == base:
        return existing  # this module imported twice in one process (VERL's plugin + env var)
    try:
        base_cls = get_trainer_cls(base)
    except ValueError as exc:
        raise VlmCreditError(
            f"VERL trainer mode {base!r} to build {name!r} on is not registered ({exc})"
        ) from None

    class VlmCreditPPOTrainer(base_cls):  # type: ignore[misc, valid-type]
        """The `base` trainer; advantages multiplied by vlmcredit's per-token weights."""

        __vlmcredit_base__ = base
        _vlmcredit: VerlWeighting | None = None

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            _weighting_from_config(config)  # refuse bad signals or loss config before any work
            super().__init__(config, *args, **kwargs)

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            batch = super()._compute_advantage(batch, metrics)
            if self._vlmcredit is None:
                holder = getattr(self, "processor", None) or getattr(self, "tokenizer", None)
                self._vlmcredit = _weighting_from_config(self.config, holder)
            weighting = self._vlmcredit
            fields = ["advantages", "responses", "response_mask", "extra_info"]
            data = tq.kv_batch_get(
                keys=batch.keys, partition_id=batch.partition_id, select_fields=fields
            )
            nested_mask = data["response_mask"]
            padded = DataProto(batch=data.to_padded_tensor())
            extra = padded.batch.pop("extra_info").tolist()
            adv, mask, stats = weighting.apply(
                padded.batch["advantages"],
                padded.batch["response_mask"],
                padded.batch["responses"],
                sample_ids_from_extra_info(extra, weighting.sample_id_key),
            )
            out = {"advantages": response_to_nested(adv, nested_mask)}
            if weighting.loss_denominator == "selected_tokens":
                # The engine's token-mean divides by loss_mask's count, the loss by response_mask.
                narrowed = response_to_nested(mask, nested_mask)
                out["response_mask"] = narrowed
                out["loss_mask"] = narrowed
            batch = tq.kv_batch_put(
                keys=batch.keys,
                partition_id=batch.partition_id,
                fields=TensorDict(out, batch_size=len(batch)),
            )
            metrics.update(stats)
            return batch

    VlmCreditPPOTrainer.__name__ = f"VlmCredit{base_cls.__name__}"
    return verl_register_trainer(name)(VlmCreditPPOTrainer)


def _register_on_import() -> None:
    """What importing this module inside VERL does: register the v1 trainer mode (verl >= 0.9)
    and wrap the legacy advantage step when VLMCREDIT_SIGNALS is set. Without VERL installed
    nothing is registered; with VERL, every failure raises."""
    import importlib.util

    if importlib.util.find_spec("verl") is None:
        return  # the adapter's tensor functions work without VERL
    if importlib.util.find_spec("verl.trainer.ppo.v1") is not None:
        register_trainer()
    if os.environ.get(ENV_SIGNALS):
        install_legacy_hook(
            VerlWeighting.from_path(
                os.environ[ENV_SIGNALS],
                loss_denominator=os.environ.get(ENV_DENOMINATOR),
                allow_unweighted_terms=_truthy(os.environ.get(ENV_UNWEIGHTED, "")),
            )
        )


if os.environ.get("VLMCREDIT_VERL_AUTOREGISTER", "1") != "0":
    _register_on_import()
