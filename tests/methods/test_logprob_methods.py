"""ToR, VPPO, high-entropy and SAYO on hand-built arrays, against the formulas written out."""

from __future__ import annotations

import numpy as np
import pytest

from vlmcredit.analysis.selection import top_share, top_share_batch
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods import registry
from vlmcredit.methods.logprob_options import PerturbConfig, collect, score_key
from vlmcredit.methods.registry import SamplePasses


def _passes(sid, logp=None, entropy=None, no_image=None, perturbed=None, key=("image",)):
    p = SamplePasses(sample_id=sid, token_ids=np.arange(len(logp if logp is not None else entropy)))
    n = len(p.token_ids)
    p.logprobs["image"] = np.asarray(logp if logp is not None else np.zeros(n), np.float32)
    p.entropy["image"] = np.asarray(entropy if entropy is not None else np.zeros(n), np.float32)
    for name, values in (("no_image", no_image), ("perturbed", perturbed)):
        if values is not None:
            p.logprobs[name] = np.asarray(values, np.float32)
            p.entropy[name] = np.zeros(n, np.float32)
    return p


def test_top_share_rounding_ties_all_equal_and_single_token() -> None:
    # k = round-half-up(0.3 * 10) = 3, binary 0.3 * 10 = 3.0000000000000004 does not make 4
    assert top_share(np.arange(10.0), 0.3).tolist() == [False] * 7 + [True] * 3
    assert top_share(np.arange(5.0), 0.3).sum() == 2  # 1.5 rounds up
    assert top_share(np.arange(7.0), 0.2).sum() == 1  # 1.4 rounds down
    # ties at the cut are all kept
    assert top_share(np.array([1.0, 3.0, 3.0, 0.0]), 0.25).tolist() == [False, True, True, False]
    assert top_share(np.full(6, 2.0), 0.2).all()
    assert top_share(np.array([0.5]), 0.2).tolist() == [True]
    assert top_share(np.zeros(0), 0.2).size == 0
    # batch scope: the cut is over all tokens
    a, b = top_share_batch([np.array([1.0, 2.0]), np.array([9.0, 8.0, 0.0])], 0.4)
    assert a.tolist() == [False, False] and b.tolist() == [True, True, False]


def test_entropy_mask_is_the_batch_top_share() -> None:
    m = registry.get("entropy")
    entropy = [np.array([0.1, 2.0, 0.3, 0.2]), np.array([5.0, 0.0, 0.4, 0.6, 0.05, 1.0])]
    out = m.run([_passes(f"s{i}", entropy=e) for i, e in enumerate(entropy)], m.make_config())
    # 10 tokens, top 20% = 2 tokens: 5.0 and 2.0
    assert out[0].mask.tolist() == [False, True, False, False]
    assert out[1].mask.tolist() == [True, False, False, False, False, False]
    np.testing.assert_array_equal(out[1].weight, out[1].mask.astype(np.float32))
    assert m.denominator_for(m.make_config()) == "selected_tokens"
    per = m.run([_passes("s", entropy=entropy[1])], m.make_config({"scope": "response"}))
    assert per[0].mask.sum() == 1  # round-half-up(0.2 * 6) = 1
    assert m.scope_for(m.make_config({"scope": "response"})) == "per_response"


def test_tor_weights_follow_the_four_cases() -> None:
    m = registry.get("tor")
    cfg = m.make_config({"reasoning_ratio": 0.25, "perception_ratio": 0.25, "scope": "response"})
    entropy = [3.0, 2.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # reasoning: tokens 0, 1
    logp = np.zeros(8)
    bare = np.array([0.0, -5.0, 4.0, 0.0, 0.0, 0.1, 0.0, 0.0])  # |delta|: tokens 2, 1
    p = _passes("s", logp=logp, entropy=entropy, no_image=bare)
    key = score_key("image", 1.0, 0.95)  # ToR scores entropy over the top-0.95 nucleus
    p.entropy[key], p.logprobs[key] = p.entropy["image"], p.logprobs["image"]
    kn = score_key("no_image", 1.0, 0.95)
    p.entropy[kn], p.logprobs[kn] = p.entropy["no_image"], p.logprobs["no_image"]
    (out,) = m.run([p], cfg)
    assert out.columns["reasoning"].tolist() == [True, True] + [False] * 6
    assert out.columns["perception"].tolist() == [False, True, True] + [False] * 5
    # token 0 reasoning only 1.0, 1 both 1.0, 2 perception only 0.5, rest 0
    np.testing.assert_array_equal(out.weight, [1.0, 1.0, 0.5, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out.columns["delta_logp"], logp - bare)
    custom = m.make_config({"scope": "response", "weight_neither": 0.1, "weight_both": 2.0,
                            "reasoning_ratio": 0.25, "perception_ratio": 0.25})  # fmt: skip
    (out2,) = m.run([p], custom)
    np.testing.assert_allclose(out2.weight, [1.0, 2.0, 0.5] + [0.1] * 5)


def test_vppo_kl_estimate_mask_and_alpha() -> None:
    m = registry.get("vppo")
    cfg = m.make_config()
    f32 = np.float32
    logp = [np.array([-1.0, -2.0, -0.5, -3.0, -1.0], f32), np.array([-0.2, -0.2], f32)]
    pert = [np.array([-1.0, -2.5, 30.0, -3.1, -40.0], f32), np.array([-0.2, -0.2], f32)]
    pairs = enumerate(zip(logp, pert, strict=True))
    passes = [_passes(f"s{i}", logp=lp, perturbed=pp) for i, (lp, pp) in pairs]
    out = m.run(passes, cfg)
    d = np.clip(pert[0].astype(np.float64) - logp[0], -20, 20)
    s = np.clip(np.exp(d) - d - 1, 0, 10)
    np.testing.assert_allclose(out[0].columns["s_t"], s, rtol=1e-6)
    np.testing.assert_allclose(out[0].columns["delta_logp"], d)
    assert out[0].columns["s_t"][2] == 10.0  # the clamps hold
    # top 40% of 5 = 2 tokens: tokens 2 and 4 have the largest S
    assert out[0].mask.tolist() == [False, False, True, False, True]
    # the second response has S = 0 everywhere: all-equal scores select every token
    assert out[1].mask.all()
    # alpha: min-max of mean S over the batch -> beta_max for the first, beta_min for the second
    assert out[0].sample_weight == pytest.approx(1.0)
    assert out[1].sample_weight == pytest.approx(0.9)
    (single,) = m.run(passes[:1], cfg)
    assert single.sample_weight == pytest.approx(0.9)  # equal means: beta_min
    assert m.denominator_for(cfg) == "all_tokens"


def _sayo_passes(attention_row: np.ndarray, boxes) -> SamplePasses:
    # a 4 x 4 grid of 28 px cells over a 112 x 112 image; one layer, one (averaged) head
    cols, rows = np.meshgrid(np.arange(4), np.arange(4))
    x0, y0 = cols.ravel() * 28, rows.ravel() * 28
    t = 3
    p = _passes("s", entropy=np.array([1.0, 0.5, 2.0]))
    p.attention = np.tile(attention_row, (1, 1, t, 1)).astype(np.float32)
    p.attention_layers, p.num_layers = [5], 6
    p.image_boxes = np.stack([x0, y0, x0 + 28, y0 + 28], axis=1).astype(np.float32)
    p.image_owner = np.zeros(16, dtype=np.int64)
    p.meta = {"extra": {"boxes": boxes}}
    return p


def test_sayo_reward_sign_follows_where_the_attention_is() -> None:
    m = registry.get("sayo")
    box = [[0, 0, 56, 56]]  # the 4 top-left cells
    inside = np.zeros(16)
    inside[[0, 1, 4, 5]] = 0.2
    outside = np.zeros(16)
    outside[[10, 11, 14, 15]] = 0.2
    cfg = m.make_config({"ratio": 0.4})
    (hit,) = m.run([_sayo_passes(inside, box)], cfg)
    (miss,) = m.run([_sayo_passes(outside, box)], cfg)
    assert hit.columns["sayo_reward"][0] > 0 > miss.columns["sayo_reward"][0]
    a, v, eps = 0.2, 0.8 / 16, 1e-6
    reward = np.tanh(np.log((a + eps) / (v + eps)))
    assert hit.columns["sayo_reward"][0] == pytest.approx(reward, rel=1e-5)
    # the paper's form maps the same ratio into [0, 1]
    (paper,) = m.run([_sayo_passes(inside, box)], m.make_config({"form": "paper"}))
    ratio = (a + eps) / (v + eps)
    assert paper.columns["sayo_reward"][0] == pytest.approx(
        0.5 * (1 + np.tanh(np.log(ratio))), rel=1e-5
    )
    assert hit.mask.tolist() == [False, False, True]  # round-half-up(0.4 * 3) = 1 token
    np.testing.assert_array_equal(hit.weight, np.ones(3))
    uniform = np.full(16, 1 / 16)
    (flat,) = m.run([_sayo_passes(uniform, box)], cfg)
    assert flat.columns["sayo_reward"][0] == pytest.approx(0.0, abs=1e-6)


def test_sayo_refuses_missing_boxes_and_uncaptured_layers() -> None:
    m = registry.get("sayo")
    p = _sayo_passes(np.full(16, 1 / 16), [[0, 0, 56, 56]])
    p.meta = {}
    with pytest.raises(VlmCreditError, match="boxes"):
        m.run([p], m.make_config())
    p = _sayo_passes(np.full(16, 1 / 16), [[0, 0, 56, 56]])
    with pytest.raises(VlmCreditError, match="layer 2"):
        m.run([p], m.make_config({"layer": 2}))


def test_pass_options_merge_scores_and_refuse_two_perturbations() -> None:
    tor, vppo, ent = (registry.get(n) for n in ("tor", "vppo", "entropy"))
    opts = collect([tor.make_config(), vppo.make_config(), ent.make_config()])
    assert opts["scores"] == [(1.0, 0.95), (1.0, 1.0)]
    assert opts["perturb"] == {"probability": 0.5, "patch_px": 14, "cells": False, "seed": 0}
    other = vppo.make_config({"perturb.seed": 3})
    with pytest.raises(VlmCreditError, match="perturb"):
        collect([vppo.make_config(), other])
    assert isinstance(vppo.make_config().perturb, PerturbConfig)
    with pytest.raises(VlmCreditError, match="probability"):
        vppo.make_config({"perturb.probability": 1.5})
