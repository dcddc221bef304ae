"""Fast MME answering: yes/no logits vs decoding, encoded-once inputs, the image-feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import FAMILIES
from vlmcredit.data.mme import read_mme
from vlmcredit.data.mme_score import parse_answer
from vlmcredit.data.mme_synth import write_synthetic_mme
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.inputs import encode_samples
from vlmcredit.models.loading import load_checkpoint
from vlmcredit.probes.mme_answer import (
    ImageFeatureCache,
    MMEInputs,
    YesNoTokens,
    answer_generate,
    answer_logits,
    answer_questions,
    gray_image,
    yes_no_tokens,
)
from vlmcredit.probes.response_attention import GenerationConfig, generate_responses
from vlmcredit.probes.tiny_answerer import yes_no_checkpoint


@pytest.fixture(scope="module")
def mme_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mme") / "synth"
    write_synthetic_mme(path, 4, seed=1)
    return path


@pytest.fixture(scope="module")
def mme_small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mme-small") / "synth"
    write_synthetic_mme(path, 2, seed=2, categories=["existence", "count", "OCR"])
    return path


def test_yes_no_tokens_of_the_tokenizer(loaded) -> None:
    tok = loaded("qwen2.5-vl").tokenizer
    tokens = yes_no_tokens(tok)
    assert tokens.yes_text == ("Yes", "yes", " yes")
    assert tokens.no_text == ("No", "no", " No", " no")
    for ids, texts, label in [
        (tokens.yes, tokens.yes_text, "yes"),
        (tokens.no, tokens.no_text, "no"),
    ]:
        for i, text in zip(ids, texts, strict=True):
            assert tok.encode(text, add_special_tokens=False) == [i]
            assert tok.decode([i]) == text and parse_answer(text + "Yes, no") == label
    from vlmcredit.models.tiny import build_tokenizer

    bytes_only = build_tokenizer(vocab_size=280)  # too few merges for a one-token "Yes"
    with pytest.raises(VlmCreditError, match=r"no single-token 'yes'.*--generate"):
        yes_no_tokens(bytes_only, "--ckpt tiny")


def test_first_token_label_reads_like_the_official_parser() -> None:
    """Variants fix their label; 4+ characters fix the parse of their text; shorter is open."""
    texts = {3: "Nothing", 4: "N", 5: "Yesterday", 6: "Hmm, ", 7: "", 8: " not", 9: "yes"}
    tokens = YesNoTokens(yes=(1,), no=(2,), decode=texts.__getitem__)
    labels = {t: tokens.first_token_label(t) for t in (1, 2, *texts)}
    assert labels == {1: "yes", 2: "no", 3: "no", 4: "other", 5: "yes", 6: "other", 7: "other",
                      8: "no", 9: "other"}  # fmt: skip
    # 9 spells "yes" but is no variant of this tokenizer: "yes" + "terday" would parse yes,
    # "yes" + "no" too, yet the logit path only trusts variants and 4+ characters
    assert [tokens.decides(t) for t in (1, 4, 5, 9)] == [True, False, True, False]
    for t, label in labels.items():  # any continuation of a decided token keeps its label
        if tokens.decides(t):
            for tail in ("", "x", " no", "yes", "\n"):
                head = {1: "Yes", 2: "No"}.get(t, texts.get(t, ""))
                assert parse_answer(head + tail) == label, (head, tail)
    assert YesNoTokens(yes=(1,), no=(2,)).first_token_label(3) == "other"  # nothing to decode
    gray = gray_image(Image.new("RGB", (37, 21), (200, 10, 30)))
    assert gray.size == (37, 21) and gray.getcolors() == [(37 * 21, (128, 128, 128))]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_logit_answers_agree_with_generate(tiny_ckpt, mme_dir, tmp_path, family) -> None:
    """Where greedy decoding starts with a yes/no token, the parsed answer = the logit answer."""
    ckpt = yes_no_checkpoint(tiny_ckpt(family), tmp_path / "yes-no", mme_dir)
    ck = load_checkpoint(ckpt, dtype="fp32")
    tokens = yes_no_tokens(ck.tokenizer)
    bank = MMEInputs(ck, read_mme(mme_dir).questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    batches = bank.batches(8)
    logit_answers = answer_questions(bank, batches, "logits", tokens)
    decoded = answer_questions(bank, batches, "generate")
    assert sorted(logit_answers) == sorted(decoded) == list(range(len(bank.questions)))
    by_logits = [logit_answers[i] for i in range(len(bank.questions))]
    by_decoding = [decoded[i] for i in range(len(bank.questions))]
    variants = set(tokens.yes) | set(tokens.no)
    starts = [g.top_token in variants for g in by_decoding]
    assert 0.6 <= sum(starts) / len(starts) < 1.0  # a good share, and some that do not
    # wherever the first token fixes the official label, the logit answer is that label
    decided = [(lg, g) for lg, g in zip(by_logits, by_decoding, strict=True)
               if tokens.decides(g.top_token)]  # fmt: skip
    assert len(decided) >= sum(starts)
    for lg, g in decided:
        assert parse_answer(lg.prediction) == parse_answer(g.prediction), (lg, g.prediction)
    # elsewhere it says "other" (scored wrong), never a yes/no the decoder did not start with
    assert all(
        lg.prediction == "(other)"
        for lg, g in zip(by_logits, by_decoding, strict=True)
        if not tokens.decides(g.top_token)
    )
    compared = [(lg, g) for lg, g, s in zip(by_logits, by_decoding, starts, strict=True) if s]
    assert {lg.prediction for lg, _ in compared} == {"Yes", "No"}  # both answers occur
    for lg, g in compared:
        assert parse_answer(g.prediction) == lg.prediction.lower(), (g.prediction, lg)
        assert lg.top_token == g.top_token  # the same greedy first token
    # the yes/no variants the decoder actually started with include more than "Yes"/"No"
    texts = {ck.tokenizer.decode([g.top_token]) for _, g in compared}
    assert {"Yes", "No"} < texts | {"Yes", "No"} and len(texts) >= 3


def _plain_logits(ck, questions, batch):
    """The reference: encode_samples (processor + pixel values) and an ordinary forward."""
    samples = [Sample([questions[i].load_image()], questions[i].question) for i in batch]
    inputs = encode_samples(ck.processor, ck.geometry, samples).inputs
    ck.model.model.rope_deltas = None
    with torch.no_grad():
        return ck.model(**inputs).logits, inputs


def _bank_logits(bank, batch):
    bank.ck.model.model.rope_deltas = None
    with torch.no_grad():
        return bank.ck.model(**bank.inputs(batch)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_equal_uncached(loaded, mme_small, family) -> None:
    ck = loaded(family)
    questions = read_mme(mme_small).questions
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    assert bank.cache.computed == len({q.image_id for q in questions})  # once per image
    batches = bank.batches(5)
    for batch in batches:
        plain, inputs = _plain_logits(ck, questions, batch)
        assert torch.equal(bank.inputs(batch)["input_ids"], inputs["input_ids"])
        assert torch.equal(_bank_logits(bank, batch), plain)  # warm cache
    assert bank.cache.computed == len({q.image_id for q in questions})  # nothing recomputed
    off = MMEInputs(ck, questions, ImageFeatureCache(0))  # no cache: computed per batch
    off.prepare()
    assert len(off.cache) == 0 and off.cache.computed == 0
    assert torch.equal(_bank_logits(off, batches[0]), _plain_logits(ck, questions, batches[0])[0])
    images = {questions[i].image_id for i in batches[0]}
    assert off.cache.computed == len(images) < len(batches[0])  # an image once per batch
    # shared prefix (one prefix forward per image, questions on a repeated KV cache) = the
    # full forward to float rounding; odd batches split some pairs into single questions
    sizes, own_lengths = set(), set()
    for batch in batches:
        groups = bank.prefix_groups(batch)
        for members, cut in groups:
            sizes.add(len(members))
            own_lengths.add(tuple(bank.encoded[i].ids.numel() - cut for i in members))
            image_tokens = (bank.encoded[members[0]].ids == ck.geometry.image_token_id).nonzero()
            assert cut > int(image_tokens.max())  # the image lies in the shared part
        shared = bank.shared_prefix_logits(batch)
        full = _bank_logits(bank, batch)[:, -1]
        assert torch.allclose(shared, full, atol=1e-5, rtol=0)
        assert torch.equal(shared.argmax(-1), full.argmax(-1))
    assert sizes == {1, 2} and any(len(set(n)) > 1 for n in own_lengths)  # ragged suffixes
    # logit answers are read off those logits: the official label of the argmax token
    tokens = yes_no_tokens(ck.tokenizer)
    answers = answer_logits(ck.model, bank.inputs(batches[0]), tokens)
    last = _plain_logits(ck, questions, batches[0])[0][:, -1]
    for row, a in zip(last, answers, strict=True):
        yes, no = row[list(tokens.yes)].max(), row[list(tokens.no)].max()
        assert a.yes_logit == pytest.approx(float(yes), abs=1e-6)
        assert a.no_logit == pytest.approx(float(no), abs=1e-6)
        top = int(row.argmax())
        text = ck.tokenizer.decode([top], skip_special_tokens=True)
        if top in tokens.yes or top in tokens.no or len(text) >= 4:
            expected = {"yes": "Yes", "no": "No", "other": "(other)"}[parse_answer(text)]
        else:  # a short first token leaves the official label open: other
            expected = "(other)"
        assert a.prediction == expected and a.top_token == top


def test_cache_respects_its_bound(loaded, mme_small) -> None:
    ck = loaded("qwen3-vl")  # deepstack: features are embeds + one map per deepstack layer
    questions = read_mme(mme_small).questions
    full = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    full.prepare()
    per_image = full.cache.nbytes // len(full.cache)
    assert per_image == full._feature_bytes(full.encoded[0].grid)
    bound = int(2.5 * per_image)
    small = MMEInputs(ck, questions, ImageFeatureCache(bound))
    small.prepare()
    assert len(small.cache) == 2 and small.cache.nbytes <= bound
    assert small.cache.computed == 2  # images that could not be kept were not computed yet
    batches = small.batches(4)
    for _ in range(2):  # two "configurations"
        for batch in batches:
            assert torch.equal(_bank_logits(small, batch), _bank_logits(full, batch))
    stats = small.cache.stats()
    assert stats["entries"] == 2 and stats["bytes"] <= bound
    # one lookup per image and batch (both questions of an image share a batch of 4)
    n_images = len({q.image_id for q in questions})
    assert stats["hits"] == 2 * 2  # two cached images x two passes
    assert stats["misses"] == stats["rejected"] == 2 * (n_images - 2)
    assert stats["vision_runs"] == 2 + stats["misses"]
    with pytest.raises(VlmCreditError, match="--feature-cache-mb"):
        ImageFeatureCache(-1)


def test_batches_keep_image_pairs_longest_first(loaded, mme_small) -> None:
    ck = loaded("qwen2-vl")
    questions = read_mme(mme_small).questions
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    batches = bank.batches(3)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(questions))) and max(map(len, batches)) == 3
    pairs = [order[k : k + 2] for k in range(0, len(order), 2)]
    assert all(questions[a].image_id == questions[b].image_id for a, b in pairs)
    lengths = [max(bank.encoded[i].ids.numel() for i in p) for p in pairs]
    assert lengths == sorted(lengths, reverse=True)


def test_generate_answers_match_the_pixel_path(loaded, mme_small) -> None:
    """Decoding with cached features = `generate_responses` on processor pixel values."""
    ck = loaded("qwen2.5-vl")
    questions = read_mme(mme_small).questions
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    batch = bank.batches(4)[0]
    answers = answer_generate(ck.model, ck.tokenizer, bank.inputs(batch), max_new_tokens=5)
    samples = [Sample([questions[i].load_image()], questions[i].question) for i in batch]
    ids, _ = generate_responses(ck, samples, GenerationConfig(5, temperature=0.0))
    eos = {ck.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for a, row in zip(answers, ids, strict=True):
        kept = [t for t in row if t not in eos]
        assert a.prediction == ck.tokenizer.decode(kept, skip_special_tokens=True)
        assert a.top_token == row[0]


def _full_logits(ck, bank, batch) -> torch.Tensor:
    """The reference: one ordinary full forward per question (explicit positions)."""
    with torch.no_grad():
        inputs = ck.adapter.with_positions(ck.model, bank.inputs(batch))
        return ck.model(**inputs, logits_to_keep=1).logits[:, -1]


def _configurations(ck) -> list[tuple[list, int]]:
    """(ablated heads, start layer): baseline, head 1 in every layer, head 1 of each layer."""
    layers = range(ck.geometry.num_layers)
    return [([], 0), ([(None, 1)], 0), *(([(layer, 1)], layer) for layer in layers)]


def _check_every_configuration(ck, questions) -> MMEInputs:
    """Shared-prefix logits (system KV per configuration; layers below the ablated one
    skipped from recorded inputs, on the second pass) = full forwards to 1e-5 in fp32, with
    the same answers."""
    from vlmcredit.probes.ablation import ablate_heads
    from vlmcredit.probes.shared_prefix import PrefixSession

    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    batches = bank.batches(5)
    tokens = yes_no_tokens(ck.tokenizer)
    for spec, start in _configurations(ck):
        with ablate_heads(ck, spec):
            for _ in range(2):  # first pass records layer `start`'s inputs, second reuses them
                session = PrefixSession(start_layer=start)
                for batch in batches:
                    shared = bank.shared_prefix_logits(batch, session)
                    full = _full_logits(ck, bank, batch)
                    assert torch.allclose(shared, full, atol=1e-5, rtol=0), (spec, start)
                    assert torch.equal(shared.argmax(-1), full.argmax(-1))
            fast = answer_questions(bank, batches, "logits", tokens, start_layer=start)
            plain = answer_questions(bank, batches, "logits", tokens, share_prefix=False)
        assert [fast[i].prediction for i in fast] == [plain[i].prediction for i in fast]
        assert [fast[i].top_token for i in fast] == [plain[i].top_token for i in fast]
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_system_prompt_and_layer_start_equal_full_forwards(loaded, mme_small, family):
    ck = loaded(family)
    questions = read_mme(mme_small).questions
    bank = _check_every_configuration(ck, questions)
    # the shared system prompt: every question's tokens before its first image token
    k = bank.system_length()
    first_image = [int((e.ids == ck.geometry.image_token_id).long().argmax()) for e in bank.encoded]
    assert 0 < k <= min(first_image)
    assert all(torch.equal(e.ids[:k], bank.encoded[0].ids[:k]) for e in bank.encoded)
    assert ck.tokenizer.decode(bank.encoded[0].ids[:k]).startswith("<|im_start|>system")
    store = bank.layer_store.stats()
    assert store["unsupported"] is None and store["skipped"] == 0
    assert store["recorded"] > 0 and store["hits"] >= store["recorded"]  # reused, not redone
    assert store["layer"] == ck.geometry.num_layers - 1 and store["rejected"] == 0


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_layer_start_inside_the_deepstack_layers(mme_small, tmp_path, family) -> None:
    """Deepstack features enter after decoder layers 0..2 here: starting at layer 1 or 2 must
    add the later ones itself, and the recorded inputs must hold the earlier ones."""
    from transformers import AutoModelForImageTextToText

    from vlmcredit.models.tiny import (
        build_config,
        build_image_processor,
        build_tokenizer,
        save_checkpoint,
    )

    tokenizer = build_tokenizer()
    config = build_config(family, tokenizer, {"num_hidden_layers": 4},
                          {"depth": 3, "deepstack_visual_indexes": [0, 1, 2]})  # fmt: skip
    torch.manual_seed(3)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    path = save_checkpoint(model, tokenizer, build_image_processor(family), tmp_path / "deep")
    ck = load_checkpoint(path, dtype="fp32")
    assert ck.geometry.deepstack_layers == (0, 1, 2)
    bank = _check_every_configuration(ck, read_mme(mme_small).questions)
    assert bank.layer_store.stats()["hits"] > 0


def test_layer_inputs_store_bound(loaded, mme_small) -> None:
    """A store too small for a batch records nothing (full forwards, same logits); 0 = off."""
    from vlmcredit.probes.ablation import ablate_heads
    from vlmcredit.probes.shared_prefix import LayerInputStore, PrefixSession

    ck = loaded("qwen2.5-vl")
    questions = read_mme(mme_small).questions
    for max_bytes in (0, 1024):
        bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
        bank.layer_store = LayerInputStore(max_bytes)
        bank.prepare()
        with ablate_heads(ck, [(2, 0)]):
            for _ in range(2):
                session = PrefixSession(start_layer=2)
                for batch in bank.batches(4):
                    shared = bank.shared_prefix_logits(batch, session)
                    full = _full_logits(ck, bank, batch)
                    assert torch.allclose(shared, full, atol=1e-5, rtol=0)
        stats = bank.layer_store.stats()
        assert stats["recorded"] == stats["hits"] == 0 and stats["bytes"] == 0
        assert stats["rejected"] == (0 if max_bytes == 0 else 2 * len(bank.batches(4)))
