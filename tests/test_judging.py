"""The judge: its reply parser on messy replies, the openai backend against a fake OpenAI-compatible
server on loopback (real HTTP), the transformers backend with the embedded SmolLM2, the proxy, the
cache, and the statistics that turn ratings into the paper's scores."""

import json
import time

import numpy as np
import pytest

from fake_openai import FakeServer
from medcomp import claims, judging, report, scoring, tables
from medcomp.judging import JudgeItem, JudgementCache, OpenAIJudge, judge_items
from medcomp.replies import parse_rating

# ------------------------------------------------------------------------------------------ the parser

MESSY_REPLIES = [
    ('{"Evaluation": "fine", "Rating": 3}', 3),
    ('```json\n{"Evaluation": "good", "Rating": 4}\n```', 4),
    ('Here is my assessment:\n```\n{"Evaluation": "x", "Rating": "2"}\n```\nHope this helps.', 2),
    ('Sure! {"Evaluation": "The answer {mostly} fits", "Rating": 3} That is all.', 3),
    ('"Evaluation": "The system answer provides a general answer", "Rating": 2', 2),  # the paper's own sample, no braces
    ("Evaluation: relevant and direct.\nRating: 4", 4),
    ("**Rating**: 1\nThe answer is irrelevant.", 1),
    ("Total rating: 3/4", 3),
    ('{"evaluation": "ok", "rating": 3.0}', 3),
    ('{"Evaluation": "ok", "total rating": 2}', 2),
    ("<think>Rating: 1 maybe? no</think>\n{\"Evaluation\": \"ok\", \"Rating\": 4}", 4),
    # never guess:
    ('{"Evaluation": "great", "Rating": 5}', None),  # out of range
    ('{"Evaluation": "meh", "Rating": 0}', None),
    ("Rating: 3.5", None),  # not a whole rating
    ("Rating: 4/5", None),  # another scale
    ('{"Rating": 2} ... on reflection {"Rating": 3}', None),  # two different ratings
    ("Rating: 2. Actually, Rating: 4.", None),
    ('{"Evaluation": "good", "Rating": "excellent"}', None),
    ("The answer is mostly helpful.", None),
    ("", None),
    (None, None),
    ("   \n ", None),
    ('{"Evaluation": "cut off mid-sentence, "Rat', None),
]


@pytest.mark.parametrize("reply,expected", MESSY_REPLIES)
def test_a_rating_is_taken_only_where_it_is_unambiguous(reply, expected):
    parsed = parse_rating(reply)
    assert parsed.rating == expected
    assert (parsed.problem is None) == (expected is not None)


def test_the_same_rating_twice_is_not_ambiguous_and_the_evaluation_is_kept():
    parsed = parse_rating('```json\n{"Evaluation": "direct", "Rating": 4}\n```\nRating: 4')
    assert parsed.rating == 4 and parsed.evaluation == "direct"


def test_the_prompt_is_the_papers_and_carries_the_item():
    messages = judging.judge_messages("What is X?", "It is Y.", "This is X.")
    assert "scale of 1 to 4" in messages[0]["content"] and '"Rating"' in messages[0]["content"]
    assert "Question: What is X?\nAnswer: It is Y.\nReference: This is X." in messages[1]["content"]


# ------------------------------------------------------------------------------------------ a fake OpenAI-compatible server

@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


ITEMS = [JudgeItem("v", f"melanoma/{i}.png|name", f"What is the name of this disease? ({i})", f"answer {i}", "This is melanoma.",
                   "melanoma", "name") for i in range(6)]


def _judge(server, **kwargs) -> OpenAIJudge:
    settings = {"timeout": 5.0, "max_retries": 2, "concurrency": 2, "api_key_env": "MEDCOMP_TEST_JUDGE_KEY"} | kwargs
    return OpenAIJudge("judge-model", server.url, **settings)


def test_429_then_success_is_retried_with_backoff(server, tmp_path):
    server.script = [("status", 429), ("status", 429)]
    [judgement] = judge_items(_judge(server, concurrency=1), ITEMS[:1], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert judgement.status == "valid" and judgement.rating == 3
    assert len(server.requests) == 3


def test_persistent_500s_fail_the_item_without_caching_it_and_a_rerun_retries(server, tmp_path):
    server.script = [("status", 500)] * 3
    cache = JudgementCache(tmp_path / "c.jsonl")
    [judgement] = judge_items(_judge(server, max_retries=2, concurrency=1), ITEMS[:1], cache, progress=False)
    assert judgement.status == "failed" and "500" in judgement.problem and judgement.rating is None
    assert len(server.requests) == 3  # first try + 2 retries
    [again] = judge_items(_judge(server), ITEMS[:1], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert again.status == "valid"


def test_a_hang_past_the_timeout_fails_the_item_quickly(server, tmp_path):
    server.script = [("hang", 3.0)]
    started = time.perf_counter()
    [judgement] = judge_items(_judge(server, timeout=0.5, max_retries=0, concurrency=1), ITEMS[:1], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert judgement.status == "failed" and "Timeout" in judgement.problem
    assert time.perf_counter() - started < 2.5


def test_a_body_that_is_not_json_fails_the_item_and_nothing_crashes(server, tmp_path):
    server.script = [("garbage",)]
    judgements = judge_items(_judge(server, max_retries=0, concurrency=1), ITEMS[:2], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert [j.status for j in judgements] == ["failed", "valid"]


def test_an_unreadable_reply_is_asked_again_then_recorded_invalid_and_cached(server, tmp_path):
    server.script = [("reply", "It is a good answer."), ("reply", '{"Evaluation": "x", "Rating": 4}'),  # item 1: fixed on the re-ask
                     ("reply", "Rating: 9"), ("reply", "no idea"), ("reply", "")]  # item 2: never readable
    cache = JudgementCache(tmp_path / "c.jsonl")
    first, second = judge_items(_judge(server, concurrency=1), ITEMS[:2], cache, parse_retries=2, progress=False)
    assert (first.status, first.rating, first.attempts) == ("valid", 4, 2)
    assert second.status == "invalid" and second.rating is None and second.attempts == 3 and second.problem == "empty reply"
    re_ask = server.requests[1]["body"]["messages"]
    assert re_ask[-2] == {"role": "assistant", "content": "It is a good answer."} and "Rating" in re_ask[-1]["content"]
    asked = len(server.requests)
    again = judge_items(_judge(server), ITEMS[:2], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert [j.status for j in again] == ["valid", "invalid"] and len(server.requests) == asked  # all from the cache


def test_the_key_comes_from_the_environment_and_goes_nowhere_else(server, tmp_path, monkeypatch, capsys):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MEDCOMP_TEST_JUDGE_KEY", secret)
    judge = _judge(server)
    judge_items(judge, ITEMS[:2], JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {secret}"
    assert secret not in judge.identity
    assert secret not in (tmp_path / "c.jsonl").read_text()
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_concurrency_is_bounded(server, tmp_path):
    server.default = ("slow", 0.3, '{"Evaluation": "ok", "Rating": 2}')
    started = time.perf_counter()
    judgements = judge_items(_judge(server, concurrency=3), ITEMS, JudgementCache(tmp_path / "c.jsonl"), progress=False)
    assert all(j.rating == 2 for j in judgements)
    assert server.max_in_flight == 3
    assert time.perf_counter() - started < 6 * 0.3  # concurrent, not one by one


# ------------------------------------------------------------------------------------------ cache, proxy, transformers


def test_the_cache_survives_a_torn_last_line_and_keys_on_every_input(tmp_path):
    cache = JudgementCache(tmp_path / "c.jsonl")
    cache.put("judge-a", ITEMS[0], judging.Judgement("valid", 3))
    with (tmp_path / "c.jsonl").open("a") as handle:
        handle.write('{"key": "abc", "judgement": {"sta')  # an interrupted write
    reopened = JudgementCache(tmp_path / "c.jsonl")
    assert reopened.skipped_lines == 1 and reopened.get("judge-a", ITEMS[0]).rating == 3
    assert reopened.get("judge-b", ITEMS[0]) is None
    changed = JudgeItem(**{**ITEMS[0].__dict__, "answer": "another answer"})
    assert reopened.get("judge-a", changed) is None


def test_the_proxy_rates_the_disease_named_and_the_closeness_to_the_reference():
    judge = judging.ProxyJudge()
    rosacea = "Rosacea is treated by avoiding triggers, daily sun protection, topical metronidazole, azelaic acid or ivermectin."
    items = [
        JudgeItem("v", "a|name", "What is the name of this disease?", "This is melanoma.", "This is melanoma.", "melanoma", "name"),
        JudgeItem("v", "b|name", "What is the name of this disease?", "This is rosacea.", "This is melanoma.", "melanoma", "name"),
        JudgeItem("v", "c|name", "What is the name of this disease?", "A skin lesion.", "This is melanoma.", "melanoma", "name"),
        JudgeItem("v", "d|treatment", "How is rosacea treated?", rosacea, rosacea, "rosacea", "treatment"),
        JudgeItem("v", "e|treatment", "How is rosacea treated?", "Psoriasis is treated with light therapy.", rosacea, "rosacea", "treatment"),
        JudgeItem("v", "f|treatment", "How is rosacea treated?", "The weather is sunny today.", rosacea, "rosacea", "treatment"),
    ]
    items.append(JudgeItem("v", "g|features", "What are the clinical features of actinic keratosis?", "Actinic keratosis is a precancéepart.",
                           "Actinic keratosis is a precancerous lesion of sun-damaged skin: a rough, dry, scaly pink or tan patch on the face, "
                           "scalp or hands that may progress to squamous cell carcinoma.", "actinic-keratosis", "features"))
    ratings = [j.rating for j in judge.rate_many(items)]
    assert ratings[0] == 4 and ratings[1] == 1 and ratings[2] == 1
    assert ratings[3] == 4 and ratings[4] == 1 and ratings[5] <= 2
    assert ratings[6] <= 2  # the disease's name alone earns nothing: names are masked before comparing
    assert judging.mask_disease_names("Eczema, or atopic dermatitis, is not melanoma.") == "this condition, or this condition, is not this condition."
    assert judge.rate_many(items) == judge.rate_many(items)  # deterministic


def test_the_transformers_backend_runs_the_embedded_smollm2_through_its_chat_template(tmp_path):
    judge = judging.TransformersJudge("embedded:smollm2", max_new_tokens=24)
    [judgement] = judge_items(judge, ITEMS[:1], JudgementCache(tmp_path / "c.jsonl"), parse_retries=1, progress=False)
    assert judgement.status in ("valid", "invalid") and judgement.reply  # a 135M model's rating may be poor; the plumbing works
    assert (judgement.rating in (1, 2, 3, 4)) == (judgement.status == "valid")
    assert "Question:" not in judgement.reply, "only the generated tokens are the reply, not the prompt"
    # what the model generates is what is parsed: make it generate a rating and read it back
    rating_ids = judge._tokenizer('{"Evaluation": "close", "Rating": 3}', return_tensors="pt")["input_ids"]
    real_generate = judge._model.generate
    judge._model.generate = lambda **kwargs: __import__("torch").cat([kwargs["input_ids"], rating_ids], dim=1)
    try:
        [forced] = judge_items(judge, ITEMS[1:2], JudgementCache(tmp_path / "d.jsonl"), parse_retries=0, progress=False)
    finally:
        judge._model.generate = real_generate
    assert forced.status == "valid" and forced.rating == 3 and forced.evaluation == "close"


# ------------------------------------------------------------------------------------------ statistics


def test_scores_scale_the_mean_rating_as_the_paper_does():
    assert scoring.score([1, 1, 1]) == 25.0  # Table 5's "unintelligible" RTN and Table 4's Prune + Quant
    assert scoring.score([4, 4]) == 100.0 and scoring.score_from_zero([1, 1]) == 0.0


def test_the_bootstrap_interval_holds_the_score_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    few, many = rng.integers(1, 5, 30), rng.integers(1, 5, 3000)
    low, high = scoring.bootstrap_ci(few)
    assert low < scoring.score(few) < high
    low_many, high_many = scoring.bootstrap_ci(many)
    assert high_many - low_many < (high - low) / 5


def test_paired_comparisons_give_plain_verdicts():
    keys = [f"k{i}" for i in range(60)]
    better = {k: 4 for k in keys}
    worse = {k: 1 + (i % 2) for i, k in enumerate(keys)}
    assert scoring.paired_difference(better, worse).verdict == "holds"
    assert scoring.paired_difference(worse, better).verdict == "does not hold"
    noisy = {k: 1 + (i * 7) % 4 for i, k in enumerate(keys)}
    shuffled = {k: 1 + (i * 3) % 4 for i, k in enumerate(keys)}
    assert scoring.paired_difference(noisy, shuffled).verdict == "within noise"
    assert scoring.paired_difference(better, {}).verdict == "not measured"


def test_agreement_of_two_judges():
    a = {f"k{i}": 1 + i % 4 for i in range(40)}
    assert scoring.agreement(a, a)["weighted kappa"] == pytest.approx(1.0)
    assert scoring.agreement(a, a)["spearman"] == pytest.approx(1.0)
    flipped = {k: 5 - v for k, v in a.items()}
    assert scoring.agreement(a, flipped)["weighted kappa"] < 0
    assert scoring.agreement(a, {"k0": 1})["items"] == 1


def test_the_pareto_front_keeps_what_nothing_beats_on_both():
    import pandas as pd

    points = pd.DataFrame({"memory": [10, 5, 5, 2, 8], "score": [80, 70, 60, 30, 50]}, index=list("abcde"))
    assert list(scoring.pareto_front(points, "memory", "score")) == ["a", "b", "d"]


# ------------------------------------------------------------------------------------------ the run's tables


class CountingJudge:
    identity, concurrency = "counting", 2

    def __init__(self):
        self.asked = 0

    def complete(self, messages):
        self.asked += 1
        return '{"Evaluation": "ok", "Rating": 2}'


def test_answers_are_judged_in_one_pass_each_distinct_answer_once_and_grouped_back(tmp_path):
    rows = [{"image": f"/x/{i}.png", "disease": "melanoma", "question_kind": "name", "question": "What is the name of this disease?",
             "answer": "This is melanoma.", "reference": "This is melanoma."} for i in range(3)]
    judge, cache = CountingJudge(), JudgementCache(tmp_path / "c.jsonl")
    judged = judging.judge_answers(judge, {"a": rows, "b": rows}, cache, progress=False)
    assert judge.asked == 1  # six answers, one distinct (question, answer, reference)
    assert [len(judged[v][1]) for v in ("a", "b")] == [3, 3] and all(j.rating == 2 for j in judged["b"][1])
    cache.put("another-judge", judged["a"][0][0], judging.Judgement("valid", 4))
    others = judging.other_judges(cache, "counting", judged["a"][0] + judged["b"][0])
    assert set(others) == {"another-judge"} and set(others["another-judge"].values()) == {4}
    assert len(others["another-judge"]) == 6  # the same answer to the same question, in both variants


def _registry():
    from medcomp.runs import Variant

    v = lambda name, stage, parent=None, layers=(), bits=16, **extra: Variant(name, stage, f"/m/{name}", parent, layers, bits, 100, "", extra)  # noqa: E731
    variants = [v("finetuned", "01_finetune", adapter="a", sft_base="b"),
                v("pruned-2", "03_prune", "finetuned", (3, 4)), v("pruned-7", "03_prune", "finetuned", tuple(range(3, 10))),
                v("pruned-8", "03_prune", "finetuned", tuple(range(3, 11))), v("pruned-7-magnitude", "03_prune", "finetuned", tuple(range(10, 17))),
                v("recovered-7", "04_sft_pruned", "pruned-7", fraction=7 / 32, adapter="a", sft_base="b"),
                v("recovered-8", "04_sft_pruned", "pruned-8", fraction=9 / 32, adapter="a", sft_base="b"),
                v("recovered-7-magnitude", "04_sft_pruned", "pruned-7-magnitude", fraction=None)]
    variants += [v(f"{source}-{m}", "05_quantize", source, bits=4, format=m) for source, methods in
                 [("finetuned", "awq bnb qlora"), ("pruned-7", "awq"), ("recovered-7", "awq bnb rtn qlora"), ("recovered-8", "awq bnb"),
                  ("recovered-7-magnitude", "awq")] for m in methods.split()]
    return {x.name: x for x in variants}


def test_every_paper_row_finds_its_variant():
    variants = _registry()
    rows = tables.paper_rows(variants, [(0.0, 0), (2 / 32, 2), (7 / 32, 7), (9 / 32, 8)])
    assert rows.table_1 == ((0, "finetuned"), (2, "pruned-2"), (7, "pruned-7"), (9, "pruned-8"))
    assert rows.table_2[0] == ("Pruned LLaVA (5.6 B)", "pruned-7", "recovered-7")
    assert rows.table_2[1] == ("Pruned LLaVA (5.2 B)", "pruned-8", "recovered-8")
    assert rows.table_2[2][0] == "magnitude baseline (Table 5)"
    assert rows.table_3 == (("Base LLaVA (7B)", "finetuned"), ("Pruned LLaVA (5.6B)", "recovered-7"), ("Pruned LLaVA (5.2B)", "recovered-8"))
    assert dict(rows.table_4) == {"Original LLaVA": "finetuned", "Pruning Only": "pruned-7", "Pruning and SFT": "recovered-7",
                                  "Quantization Only": "finetuned-awq", "Prune + Quant": "pruned-7-awq", "Prune + SFT + Quant": "recovered-7-awq"}
    assert dict(rows.beyond) == {"QLoRA deployment: nf4 base + unmerged adapter (08)": "finetuned-qlora",
                                 "Prune + SFT, QLoRA deployment (08)": "recovered-7-qlora"}  # 08's, registered
    assert dict(rows.table_5) == {"Full pipeline (ours)": "recovered-7-awq", "Bitsandbytes quantization": "recovered-7-bnb",
                                  "Pruning Based on Magnitude Baseline": "recovered-7-magnitude-awq", "Round to neighbour Quantization": "recovered-7-rtn"}


def test_scored_tables_put_the_paper_beside_and_the_verdicts_follow_the_intervals():
    from medcomp import paper

    variants = _registry()
    rows = tables.paper_rows(variants, [(0.0, 0), (2 / 32, 2), (7 / 32, 7), (9 / 32, 8)])
    keys = [f"k{i}" for i in range(117)]
    level = {"finetuned": 4, "recovered-7-awq": 3, "pruned-7-awq": 1, "recovered-7-bnb": 3, "pruned-8": 1, "recovered-7": 3, "pruned-7": 2}
    scores = {name: scoring.VariantScore(name, {k: level.get(name, 2) for k in keys}, 0, 0, {}) for name in variants}
    table5 = tables.scored_table_5(rows, scores, paper.TABLE_5)
    assert table5.loc["Full pipeline (ours)", "paper: score"] == 54.25
    assert table5.loc["Full pipeline (ours)", "ours − paper"] == round(75 - 54.25, 1)
    table4 = tables.scored_table_4(rows, scores, paper.TABLE_4)
    assert table4.loc["Prune + Quant", "score [95% CI]"].startswith("25.0") and table4.loc["Original LLaVA", "paper: score"] == 80.12
    assert tables.scored_table_1(rows, scores, paper.TABLE_1, variants).loc["pruned-8", "paper: score"] == 36.25
    assert tables.scored_table_2(rows, scores, paper.TABLE_2).loc["Pruned LLaVA (5.6 B)", "after: paper: score"] == 74.25
    assert "BNB: score [95% CI]" in tables.scored_table_3(rows, scores, paper.TABLE_3).columns
    verdicts = claims.verdicts(claims.paper_claims(rows, variants), scores)
    by_claim = {claim.split(" (")[0].split(":")[0]: v for claim, v in verdicts["verdict"].items()}
    assert by_claim["pruning degrades with depth"] == "holds"
    assert by_claim["the full pipeline beats prune + quantize without SFT"] == "holds"
    assert by_claim["AWQ beats bitsandbytes after pruning and SFT"] == "within noise"  # identical ratings: a zero-width interval at 0
    assert by_claim["the similarity ranking beats the magnitude ranking"] == "holds"
    headline = report.headline_html(tables.relabel(table4, "proxy score"), verdicts, claims.final_ratios(rows, scores, None), "embedded", "proxy score")
    assert "proxy score" in headline and "not the paper" in headline and "holds" in headline and "80.12" in headline


def test_a_row_the_paper_never_built_reads_a_dash_in_the_paper_columns_never_nan():
    from medcomp import paper

    variants = _registry()
    rows = tables.paper_rows(variants, [(0.0, 0), (2 / 32, 2), (7 / 32, 7), (9 / 32, 8)])
    scores = {name: scoring.VariantScore(name, {f"k{i}": 3 for i in range(117)}, 0, 0, {}) for name in variants}
    scored = tables.scored_tables(rows, scores, variants, None)
    for title, frame in scored.items():
        assert not frame.isna().any().any(), title
        assert "NaN" not in frame.to_html(), title
    table4 = scored["Table 4 · overall"]
    qlora = "QLoRA deployment: nf4 base + unmerged adapter (08)"
    assert table4.loc[qlora, "paper: VRAM (GB)"] == tables.NOT_IN_THE_PAPER
    assert table4.loc["Original LLaVA", "paper: VRAM (GB)"] == 13.4  # a paper row keeps its number
    headline = report.headline_html(table4, claims.verdicts(claims.paper_claims(rows, variants), scores), {}, "embedded", "score")
    assert "NaN" not in headline
    assert tables.table_5([], {}, paper.TABLE_5).empty  # no ablation built: an empty table, not a KeyError


def test_scores_by_question_kind():
    items = [JudgeItem("v", f"k{i}", "q", "a", "r", "melanoma", kind) for i, kind in enumerate(["name", "name", "features"])]
    judgements = [judging.Judgement("valid", 4), judging.Judgement("valid", 2), judging.Judgement("invalid", None)]
    table = scoring.scores_by_question({"v": (items, judgements)})
    assert table.loc["v", "name"] == 75.0 and "features" not in table.columns


@pytest.mark.parametrize("reply", ['{"Rating": 3, "rating": 4}', '{"rating": 2, " RATING ": 3}', '{"Total Rating": 1, "total  rating": 4}'])
def test_rating_keys_that_differ_only_in_case_or_spacing_and_disagree_are_ambiguous(reply):
    from medcomp.replies import parse_rating

    parsed = parse_rating(reply)
    assert parsed.rating is None and parsed.problem.startswith("ambiguous: key")


def test_rating_keys_that_differ_only_in_case_and_agree_give_the_rating():
    from medcomp.replies import parse_rating

    assert parse_rating('{"Rating": 3, "rating": 3}').rating == 3


def test_this_packages_claims_compare_at_the_same_bytes_and_against_95_percent_of_the_source():
    from medcomp import claims, paper
    from medcomp.runs import Variant
    from medcomp.scoring import VariantScore

    variants = _registry() | {n: Variant(n, "08_beyond", f"/m/{n}", "finetuned-awq", (), 4) for n in ("finetuned-awq-qalora", "recovered-7-awq-qalora")}
    rows = tables.paper_rows(variants, [(0.0, 0), (7 / 32, 7)])
    listed = claims.beyond_claims(rows, variants)
    assert [(c.better, c.worse, c.factor) for c in listed] == [
        ("finetuned-awq-qalora", "finetuned-awq", 1.0), ("finetuned-awq-qalora", "finetuned", 0.95),
        ("recovered-7-awq-qalora", "recovered-7-awq", 1.0), ("recovered-7-awq-qalora", "recovered-7", 0.95)]
    items = [f"i{k}" for k in range(60)]
    score = lambda name, rating: VariantScore(name, {k: rating for k in items}, 0, 0, {})  # noqa: E731
    # all 4s against all 4s: equal, but 4 > 0.95 × 4 (holds); all 3s: 3 < 3.8 (does not hold); 0.75 × 4 = 3 against 3: noise
    scores = {"finetuned": score("finetuned", 4), "finetuned-awq-qalora": score("finetuned-awq-qalora", 4), "finetuned-awq": score("finetuned-awq", 4),
              "recovered-7": score("recovered-7", 4), "recovered-7-awq-qalora": score("recovered-7-awq-qalora", 3), "recovered-7-awq": score("recovered-7-awq", 3)}
    table = claims.verdicts(listed, scores, 200, 0)
    verdict = {(c.better, c.worse): v for c, v in zip(listed, table["verdict"])}
    assert verdict[("finetuned-awq-qalora", "finetuned")] == "holds"
    assert verdict[("recovered-7-awq-qalora", "recovered-7")] == "does not hold"
    assert verdict[("finetuned-awq-qalora", "finetuned-awq")] == verdict[("recovered-7-awq-qalora", "recovered-7-awq")] == "within noise"
    ratios = scoring.paper_frontier(paper.TABLE_4)
    assert ratios.loc["Prune + SFT + Quant", "score × finetuned"] == pytest.approx(54.25 / 80.12)
    assert ratios.loc["Prune + SFT + Quant", "model MB × finetuned"] == pytest.approx(3.9 / 13.4)
