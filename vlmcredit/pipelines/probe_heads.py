"""`vlmcredit probe-heads` as a library call: head ablation on MME -> vision-critical heads.

Protocol (KAWHI, MME): score MME with the unablated model (the baseline), then once per
configuration with its heads ablated, and call a configuration vision-critical when its score
drops by more than a threshold. A configuration is one head index in every decoder layer at once
(`mode="head-index"`, the paper's protocol) or one (layer, head) pair (`mode="layer-head"`).
Controls come from the same run: the gray-image control (every image replaced by a uniform gray
image of its size, unablated model) is one more unit; constant-yes / constant-no are the official
scores of all-yes / all-no predictions. The threshold rule (absolute points, or relative to the
gap between baseline and gray-image control) is chosen in `analysis.heads.choose_threshold_rule`.

The run folder (vlmcredit/runs.py) holds one committed unit per configuration, so a killed run
resumes with every finished configuration kept:
    manifest.json                 parameters, checkpoint, MME set, timing, feature-cache stats
    samples.parquet               one row per unit: "means" (mean ablation's reference, its
                                  tensor in a shard), "baseline", "gray-image", "head-3" /
                                  "layer-5-head-3" (status done), and MME images skipped
                                  with --skip-bad (bad)
    predictions/<unit>.parquet    per question: the MME prediction columns (read_predictions /
                                  `vlmcredit mme-score` read it) + logits / first token
    heads.json, heads.parquet     written when every configuration is done (docs/FORMATS.md)
Threshold, threshold rule, relative share and metric only select among measured drops: they are
not part of what a resume must match, so `--resume` on a finished run re-selects with new values
without recomputing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlmcredit.analysis.heads import (
    ABLATIONS,
    MODES,
    answer_shares,
    build_heads_report,
    check_metric,
    check_share,
    check_threshold,
    choose_threshold_rule,
    scores_dict,
    threshold_rule,
)
from vlmcredit.data.mme import CATEGORIES, MMEQuestion, canonical_categories
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_parquet
from vlmcredit.formats.heads import write_heads
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.distributed import from_lead, gather, rank_device
from vlmcredit.pipelines.skeleton import (
    conclude,
    drive,
    marks_failure,
    open_run,
    refuse_taken,
    shares,
)

BASELINE = "baseline"
GRAY = "gray-image"
MEANS = "means"
PREDICTIONS_DIR = "predictions"


@dataclass
class ProbeHeadsConfig:
    ckpt: str
    mme: Path
    out: Path
    categories: str | None = None  # comma-separated MME categories (any case); None = all
    mode: str = "head-index"  # or "layer-head"
    layers: str | None = "all"  # layer-head mode: "all" / "0,3,5-7" / "-1"
    heads: str | None = "all"  # restrict head indices, same syntax
    ablation: str = "zero"  # or "mean" (mean o_proj input over the MME set)
    generate: bool = False  # decode up to 16 tokens and parse, instead of yes/no logits
    share_prefix: bool = True  # logits mode: run an image's common prompt prefix once
    batch_size: int = 8
    max_questions: int | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    skip_bad: bool = False
    trust_remote_code: bool = False
    threshold: float | None = None  # points (absolute rule); None = the rule's default
    threshold_rule: str | None = None  # "absolute" | "relative"; None = chosen from the set
    relative_share: float | None = None  # relative rule's share; None = RELATIVE_SHARE
    metric: str = "total"  # or "perception"
    feature_cache_mb: float = 4096.0
    resume: bool = False

    def check(self) -> None:
        """Option errors that need no data or model (one line each)."""
        if self.mode not in MODES:
            raise VlmCreditError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if self.ablation not in ABLATIONS:
            choices = ", ".join(ABLATIONS)
            raise VlmCreditError(f"--ablation {self.ablation}: choose one of {choices}")
        if self.mode == "head-index" and self.layers not in (None, "", "all"):
            raise VlmCreditError(
                f"--layers {self.layers}: head-index mode ablates every layer at once; use "
                "--mode layer-head to choose layers"
            )
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_questions is not None and self.max_questions < 2:
            raise VlmCreditError(
                f"--max-questions {self.max_questions}: must be at least 2 (MME scores both "
                "questions of an image)"
            )
        if not self.feature_cache_mb >= 0:
            raise VlmCreditError(f"--feature-cache-mb {self.feature_cache_mb}: must be >= 0")
        check_metric(self.metric)
        if self.threshold is not None:
            check_threshold(self.threshold, self.metric)
        if self.relative_share is not None:
            check_share(self.relative_share)
        choose_threshold_rule(  # conflicting selection options, before any work
            self.threshold_rule, self.threshold, self.relative_share, [], full_mme=False
        )

    def parameters(self) -> dict[str, Any]:
        """What a resume must match: everything that changes a configuration's answers."""
        params = asdict(self)
        for key in ("out", "resume", "device", "device_map", "feature_cache_mb"):
            params.pop(key)
        # selection only; recorded under "selection"
        for key in ("threshold", "threshold_rule", "relative_share", "metric"):
            params.pop(key)
        params["mme"] = str(Path(self.mme).resolve())
        return params


@dataclass(frozen=True)
class Ablation:
    """One configuration: (None, None) = baseline, (None, h) = head h everywhere, (l, h)."""

    layer: int | None
    head: int | None

    @property
    def name(self) -> str:
        if self.head is None:
            return BASELINE
        if self.layer is None:
            return f"head-{self.head}"
        return f"layer-{self.layer}-head-{self.head}"


def ablation_plan(
    mode: str, num_layers: int, num_heads: int, layers: str | None, heads: str | None
) -> list[Ablation]:
    """Baseline first, then each configuration in (layer, head) order."""
    from vlmcredit.models.selection import parse_indices

    head_list = parse_indices(heads, num_heads, "--heads") or list(range(num_heads))
    plan = [Ablation(None, None)]
    if mode == "head-index":
        return plan + [Ablation(None, h) for h in head_list]
    layer_list = parse_indices(layers, num_layers, "--layers") or list(range(num_layers))
    return plan + [Ablation(layer, h) for layer in layer_list for h in head_list]


def select_questions(questions: Sequence[MMEQuestion], limit: int | None) -> list[MMEQuestion]:
    """At most `limit` questions: whole images (both questions), taken in turn per category.

    Taking the first N questions would only cover the first category; a quick look should see
    every category, and MME scores an image only with both of its questions.
    """
    if limit is None or limit >= len(questions):
        return list(questions)
    per_category: dict[str, list[str]] = {}
    for q in questions:
        images = per_category.setdefault(q.category, [])
        if q.image_id not in images:
            images.append(q.image_id)
    chosen: set[str] = set()
    rank = 0
    while len(chosen) < limit // 2:
        round_images = [imgs[rank] for imgs in per_category.values() if rank < len(imgs)]
        if not round_images:
            break
        chosen.update(round_images[: limit // 2 - len(chosen)])
        rank += 1
    return [q for q in questions if q.image_id in chosen]


def mme_fingerprint(questions: Sequence[MMEQuestion]) -> str:
    """sha1 over question ids, texts, answers and image sizes: what a resume must find again."""
    h = hashlib.sha1()
    for q in questions:
        ref = q.image_ref
        size = len(ref) if isinstance(ref, bytes) else Path(ref).stat().st_size
        h.update(f"{q.question_id}\t{q.question}\t{q.answer}\t{size}\n".encode())
    return h.hexdigest()


def predictions_frame(
    questions: Sequence[MMEQuestion], answers: Sequence[Any], tokens: Any = None
) -> Any:
    """One configuration's answers as a table `read_predictions` accepts (plus our columns).

    With the logit path's `tokens` (YesNoTokens), `top_text` is the argmax token's text and
    `first_token_decides` whether that token alone fixes the official label.
    """
    import pandas as pd

    from vlmcredit.data.mme_score import parse_answer

    decode = tokens.decode if tokens is not None else None
    return pd.DataFrame(
        {
            "image_id": [q.image_id for q in questions],
            "category": [q.category for q in questions],
            "question": [q.question for q in questions],
            "answer": [q.answer for q in questions],
            "prediction": [a.prediction for a in answers],
            "question_id": [q.question_id for q in questions],
            "parsed": [parse_answer(a.prediction) for a in answers],
            "top_token": pd.array([a.top_token for a in answers], dtype="int64"),
            "yes_logit": pd.array([a.yes_logit for a in answers], dtype="Float32"),
            "no_logit": pd.array([a.no_logit for a in answers], dtype="Float32"),
            "top_text": [decode(a.top_token) if decode else None for a in answers],
            "first_token_decides": pd.array(
                [tokens.decides(a.top_token) if tokens else None for a in answers],
                dtype="boolean",
            ),
        }
    )


def _scores(path: Path) -> dict[str, Any]:
    from vlmcredit.data.mme_score import read_predictions, score_predictions

    return scores_dict(score_predictions(read_predictions(path)))


def _answers(path: Path) -> dict[str, Any]:
    """`answer_shares` of one configuration's stored predictions."""
    import pandas as pd

    frame = pd.read_parquet(path)
    decides = frame.get("first_token_decides")  # absent in runs written before it existed
    if decides is None or decides.isna().all():
        undecided = None
    else:
        undecided = int((~decides.fillna(True)).sum())
    return answer_shares(list(frame["parsed"]), undecided)


def constant_scores(questions: Sequence[MMEQuestion], answer: str) -> dict[str, Any]:
    """The official score of answering `answer` to every question (constant-yes / -no)."""
    from vlmcredit.data.mme_score import MMEPrediction, score_predictions

    rows = (MMEPrediction(q.image_id, q.category, q.question, q.answer, answer) for q in questions)
    return scores_dict(score_predictions(rows))


@marks_failure
def run_probe_heads(
    cfg: ProbeHeadsConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """Score MME for the baseline and every ablation configuration; write heads.json."""
    from vlmcredit.data.mme import read_mme
    from vlmcredit.formats.provenance import tokenizer_hash, weights_hash
    from vlmcredit.models.loading import load_checkpoint

    cfg.check()
    wanted = (
        canonical_categories([c for c in cfg.categories.split(",") if c.strip()])
        if cfg.categories
        else None
    )
    refuse_taken(cfg.out, cfg.resume, parallel=True)
    start = time.perf_counter()
    device = rank_device(cfg.device, cfg.device_map)
    try:
        mme = read_mme(cfg.mme, wanted, skip_bad=cfg.skip_bad)
    except VlmCreditError as exc:
        raise VlmCreditError(f"--mme {exc}") from None
    questions = select_questions(mme.questions, cfg.max_questions)
    categories = [c for c in mme.categories if any(q.category == c for q in questions)]
    if cfg.threshold is not None:
        check_threshold(cfg.threshold, cfg.metric, categories)
    else:
        check_threshold(0.0, cfg.metric, categories)  # the metric must score something here
    full_mme = len(categories) == len(CATEGORIES) and len(questions) == len(mme.questions)
    rule_name, rule_reason = choose_threshold_rule(
        cfg.threshold_rule, cfg.threshold, cfg.relative_share, categories, full_mme
    )

    ck = load_checkpoint(cfg.ckpt, cfg.dtype, device, cfg.device_map, cfg.trust_remote_code)
    geo = ck.geometry
    plan = ablation_plan(cfg.mode, geo.num_layers, geo.num_heads, cfg.layers, cfg.heads)
    units = [BASELINE, GRAY, *(a.name for a in plan[1:])]  # what gets a predictions file
    answering = "generate" if cfg.generate else "logits"
    import torch

    from vlmcredit.probes.ablation import ablate_heads, head_means
    from vlmcredit.probes.mme_answer import (
        GENERATE_TOKENS,
        GRAY_LEVEL,
        ImageFeatureCache,
        MMEInputs,
        answer_questions,
        gray_image,
        yes_no_tokens,
    )

    tokens = yes_no_tokens(ck.tokenizer, f"--ckpt {cfg.ckpt}") if answering == "logits" else None
    checkpoint = {
        "id": cfg.ckpt,
        "path": str(ck.path),
        "family": ck.adapter.cli_name,
        "weights_sha1": weights_hash(ck.path),
        "geometry": asdict(geo),
    }
    params = {**cfg.parameters(), "mme_sha1": mme_fingerprint(questions)}
    extra = {
        "checkpoint": {**checkpoint, "tokenizer_sha1": tokenizer_hash(ck.processor)},
        "mme": {
            "path": str(Path(cfg.mme).resolve()),
            "layout": mme.layout,
            "num_questions": len(questions),
            "num_images": len({q.image_id for q in questions}),
            "categories": categories,
            "skipped": [{"where": w, "error": e} for w, e in mme.bad],
        },
        "answering": {
            "mode": answering,
            "yes_tokens": list(tokens.yes_text) if tokens else None,
            "no_tokens": list(tokens.no_text) if tokens else None,
            "max_new_tokens": GENERATE_TOKENS if answering == "generate" else None,
            "rule": "official label of the full-vocabulary argmax token: a yes/no variant, or "
            "a token of 4+ characters parsed officially; any other token -> other"
            if tokens
            else "greedy decoding, official MME parsing",
            "shared_prefix": bool(tokens) and cfg.share_prefix,
        },
        "ablation": {
            "mode": cfg.ablation,
            "site": "o_proj input (forward pre-hook)",
            "means": "mean o_proj input over every non-padding token of the scored questions"
            if cfg.ablation == "mean"
            else None,
        },
        "configurations": units,
        "controls": {
            "gray_image": f"every image replaced by a uniform RGB gray ({GRAY_LEVEL}) image of "
            "the same size, unablated model, same answering",
            "constant_yes": "official score of answering Yes to every question",
            "constant_no": "official score of answering No to every question",
        },
        "timing": {"configurations": {}},
    }
    bad = [{"id": f"bad:{w}", "status": "bad", "error": e} for w, e in mme.bad]
    run = open_run(Path(cfg.out), "probe-heads", params, cfg.resume, extra, bad)
    run.manifest["selection"] = {
        "metric": cfg.metric,
        "threshold": cfg.threshold,
        "threshold_rule": rule_name,
        "relative_share": cfg.relative_share,
    }
    run.write_manifest()
    lead = run.rank == 0
    if not lead:  # rank 0 alone reports; the others work quietly
        progress, log = None, lambda _msg: None
    done = run.done_ids()
    # One unit per configuration, in this order (the relative threshold needs baseline and
    # gray first); with several ranks each answers its share of the units not yet done.
    unit_heads = {BASELINE: [], GRAY: [], **{a.name: [(a.layer, a.head)] for a in plan[1:]}}
    one_each = [[name] for name in units]
    mine = [units[i] for i in shares(run, one_each, lambda name: name)]
    left = [name for name in units if name not in done]
    ablating = any(unit_heads[name] for name in left)
    need_means = cfg.ablation == "mean" and MEANS not in done and ablating
    n = len(questions)
    on_bank = any(name != GRAY for name in mine) or (need_means and lead)
    prepare = (1 if on_bank else 0) + (1 if GRAY in mine else 0)  # encoding passes
    means_pass = 1 if need_means and lead else 0
    total = n * (len(units) - len(left) + len(mine) + prepare + means_pass)
    state = {"done": n * (len(units) - len(left))}

    def advance(count: int) -> None:
        state["done"] += count
        if progress:
            progress(state["done"], total)

    share = f"; rank 0 of {run.world} takes {len(mine)}" if run.world > 1 else ""
    log(
        f"{n} questions, {len(units)} configurations incl. the gray-image control "
        f"({len(units) - len(left)} already done{share})"
    )
    advance(0)
    cache = ImageFeatureCache(int(cfg.feature_cache_mb * 2**20))
    bank = MMEInputs(ck, questions, cache)
    timing = run.manifest.setdefault("timing", {"configurations": {}})
    clock = [start]

    def book_wall() -> None:
        """Add the wall time since the last booking to `timing.total` (rank 0's, written with
        the manifest after each configuration), so a resumed run sums every invocation."""
        now = time.perf_counter()
        if lead:
            timing["total"] = timing.get("total", 0.0) + now - clock[0]
        clock[0] = now

    if on_bank:
        t0 = time.perf_counter()
        bank.prepare(advance)
        timing["prepare"] = time.perf_counter() - t0
    batches = bank.batches(cfg.batch_size) if on_bank else []

    def compute_means() -> Any:
        t0 = time.perf_counter()
        values = head_means(ck, (bank.inputs(b) for b in batches), advance)
        run.commit([{"id": MEANS, "status": "done"}], {f"{MEANS}/value": values})
        timing["means"] = time.perf_counter() - t0
        return values

    means = None
    if cfg.ablation == "mean" and ablating:
        # computed once (by rank 0) and handed to every rank, so all ablate with the same values
        means = run.tensors(MEANS)["value"] if MEANS in done else from_lead(compute_means)

    (Path(cfg.out) / PREDICTIONS_DIR).mkdir(exist_ok=True)

    def answer_unit(unit: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        (name,) = unit
        unit_bank, unit_batches = bank, batches
        if name == GRAY:
            t0 = time.perf_counter()
            unit_bank = MMEInputs(ck, questions, cache, image_transform=gray_image)
            unit_bank.prepare(advance)
            timing["prepare_gray"] = time.perf_counter() - t0
            unit_batches = unit_bank.batches(cfg.batch_size)
        t0 = time.perf_counter()
        heads = unit_heads[name]  # none for baseline and gray: no means needed for them
        with ablate_heads(ck, heads, cfg.ablation if heads else "zero", means) as hooked:
            # layers below the lowest ablated one are the baseline's: may be skipped
            answers = answer_questions(
                unit_bank, unit_batches, answering, tokens, advance, cfg.share_prefix,
                start_layer=min(hooked, default=0),
            )  # fmt: skip
        frame = predictions_frame(questions, [answers[i] for i in range(n)], tokens)
        atomic_write_parquet(_predictions_path(run.path, name), frame)
        timing["configurations"][name] = time.perf_counter() - t0
        book_wall()
        run.write_manifest()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [{"id": name, "status": "done"}], {}

    drive(run, one_each, lambda name: name, answer_unit)
    if run.world > 1:  # every rank's timing in the one manifest rank 0 writes
        ranks_timing = gather(timing)
        for other in ranks_timing:
            timing["configurations"].update(other["configurations"])
        timing["ranks"] = [
            {k: v for k, v in t.items() if k not in ("configurations", "ranks", "total")}
            for t in ranks_timing
        ]

    def select() -> None:  # on rank 0 alone, once every unit is done
        baseline = _scores(_predictions_path(run.path, BASELINE))
        gray_scores = _scores(_predictions_path(run.path, GRAY))
        controls = {
            "constant_yes": constant_scores(questions, "Yes"),
            "constant_no": constant_scores(questions, "No"),
            "gray_image": gray_scores,
        }
        rule = threshold_rule(
            rule_name,
            rule_reason,
            cfg.metric,
            baseline,
            gray_scores,
            threshold=cfg.threshold,
            share=cfg.relative_share,
        )
        if rule["rule"] == "absolute":
            check_threshold(rule["threshold"], cfg.metric, categories)
        if rule["warning"]:
            log(f"warning: {rule['warning']}")
        log(f"threshold rule: {rule['rule']} ({rule['reason']}): {rule['formula']}")
        answers = {name: _answers(_predictions_path(run.path, name)) for name in units}
        undecided = [name for name in units if answers[name]["undecided"]]
        if undecided:  # the logit path's one approximation, counted where it happened
            worst = max(undecided, key=lambda name: answers[name]["undecided"])
            log(
                f"warning: in {len(undecided)} of {len(units)} configurations some logit answers "
                "start with a token too short to fix the official label (read as other; up to "
                f"{100 * answers[worst]['undecided']:.0f}% in {worst}); --generate decodes them"
            )
        results = [
            (a.layer, a.head, _scores(_predictions_path(run.path, a.name))) for a in plan[1:]
        ]
        report = build_heads_report(
            checkpoint=checkpoint,
            mode=cfg.mode,
            ablation=cfg.ablation,
            answering=answering,
            metric=cfg.metric,
            threshold=rule["threshold"],
            num_questions=n,
            categories=categories,
            baseline=baseline,
            results=results,
            rule=rule,
            controls={**controls, "gray_image": {**gray_scores, "answers": answers[GRAY]}},
            answers=answers[BASELINE],
            head_answers=[answers[a.name] for a in plan[1:]],
        )
        write_heads(run.path, report)
        skipped = bank.layer_store.skipped
        if skipped:  # the layer-head shortcut was off: slower, same answers
            log(f"note: {skipped} batches ran every decoder layer: {bank.layer_store.unsupported}")
        seconds = sum(timing["configurations"].values())
        book_wall()
        run.finish(
            invocations=1 + len(run.manifest.get("resumed_at", [])),
            num_configurations=len(units),
            critical=report["critical"],
            critical_heads=report["critical_heads"],
            baseline_total=baseline["total"],
            feature_cache=cache.stats(),
            layer_inputs=bank.layer_store.stats(),
            questions_per_second=(n * len(units) / seconds) if seconds else None,
        )

    return conclude(run, select)


def _predictions_path(run_dir: Path, name: str) -> Path:
    return run_dir / PREDICTIONS_DIR / f"{name}.parquet"
