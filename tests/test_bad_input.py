"""Bad input of every kind the pipeline meets: judge replies, judge outages, params, interrupted runs."""

from __future__ import annotations

import socket

import pytest

from medcomp import judging
from medcomp.judging import JudgeItem, JudgementCache, OpenAIJudge, judge_answers, judge_items
from medcomp.params import ParamsError, load_params, looks_like_variable_name
from medcomp.replies import parse_rating
from medcomp.stages.judge import incomplete_reason

ITEMS = [JudgeItem("v", f"melanoma/{i}.png|name", f"What is the name of this disease? ({i})", f"answer {i}", "This is melanoma.",
                   "melanoma", "name") for i in range(4)]


@pytest.mark.parametrize("reply", ['{"Rating": NaN}', '{"Rating": Infinity}', '{"Rating": -Infinity}', '{"Rating": 1e400}',
                                   '{"Rating": ' + "9" * 400 + "}", "Rating: " + "9" * 400, '{"Rating": [3]}', '{"Rating": {"x": 1}}',
                                   "[" * 100000 + "]" * 100000, '{"Rating": 3}{"Rating": NaN}', 42, b"bytes", None, "\x00\x01"])
def test_no_reply_crashes_the_reader_and_none_gives_a_guessed_rating(reply):
    parsed = parse_rating(reply)
    assert parsed.rating is None and parsed.problem
    assert len(parsed.problem) < 200  # a reason, not the reply echoed back


def test_a_sane_reply_still_reads():
    assert parse_rating('Evaluation: fine.\n{"Rating": 3}').rating == 3


class _Replies:
    concurrency = 2
    identity = "scripted"

    def __init__(self, reply):
        self.reply = reply

    def complete(self, messages):
        return self.reply


def test_a_non_finite_rating_is_asked_again_then_invalid_never_a_crash(tmp_path):
    [judgement] = judge_items(_Replies('{"Rating": NaN}'), ITEMS[:1], JudgementCache(tmp_path / "c.jsonl"), parse_retries=1, progress=False)
    assert judgement.status == "invalid" and judgement.attempts == 2 and "not a number" in judgement.problem


def test_a_judge_outage_leaves_the_stage_incomplete_and_a_rerun_retries_exactly_the_failed(tmp_path, monkeypatch):
    from medcomp.rehearsal import LoopbackJudge

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    answers = {"v": [{"image": f"melanoma/{i}.png", "question_kind": "name", "question": f"Q{i}?", "answer": f"melanoma {i}",
                      "reference": "This is melanoma.", "disease": "melanoma"} for i in range(3)]}
    with socket.socket() as probe:  # a port nothing listens on: the endpoint is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = OpenAIJudge("m", f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY", concurrency=3, timeout=5, max_retries=0)
    judged = judge_answers(judge, answers, JudgementCache(tmp_path / "judgements.jsonl"), progress=False)
    reason = incomplete_reason(judged)
    assert reason and reason.startswith("3 of 3 answers could not be judged") and "Connection" in reason
    assert not (tmp_path / "judgements.jsonl").exists() or not (tmp_path / "judgements.jsonl").read_text().strip()
    with LoopbackJudge(port) as server:  # the endpoint is back: the same judge, the same URL
        judged = judge_answers(judge, answers, JudgementCache(tmp_path / "judgements.jsonl"), progress=False)
        assert incomplete_reason(judged) is None and len(server.requests) == 3
        again = judge_answers(judge, answers, JudgementCache(tmp_path / "judgements.jsonl"), progress=False)
        assert len(server.requests) == 3, "a rerun asks only for what is missing"
        assert [j.rating for _, js in again.values() for j in js] == [j.rating for _, js in judged.values() for j in js]


def test_a_judge_that_returns_fewer_judgements_than_asked_is_an_error_not_a_shifted_table(tmp_path):
    class Short(_Replies):
        def rate_many(self, items):
            return [judging.Judgement("valid", 4, "", None, 1, "")] * (len(items) - 1)

    with pytest.raises(ValueError):
        judge_items(Short(""), ITEMS, JudgementCache(tmp_path / "c.jsonl"), progress=False)


# ------------------------------------------------------------------------------------------ params


@pytest.mark.parametrize("pasted", ["hf_abcdefghijklmnopqrstuvwxyz0123456789", "gsk_ABCdef123", "sk-proj-abc123", "AKIAIOSFODNN7EXAMPLE",
                                    "ghp_AbCdEf0123456789", "MY_KEY_ABCDEF1234567890XYZ", "ya29.a0AfH6SM", "lowercase_name"])
def test_a_secret_pasted_as_the_key_variable_is_refused_and_never_echoed(tmp_path, pasted):
    path = tmp_path / "p.yaml"
    path.write_text(f"run_name: x\nworld: real\njudge: {{api_key_env: '{pasted}'}}\n")
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert pasted not in str(refused.value) and "api_key_env" in str(refused.value)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "GROQ_API_KEY", "VLLM_KEY_2"])
def test_ordinary_variable_names_are_accepted(name):
    assert looks_like_variable_name(name)


@pytest.mark.parametrize("key, value", [("judge.model", "sk-proj-AbCdEf0123456789xyz"), ("run_name", "x"), ("data.root", "/data/hf_AbCdEfGhIj0123456789")])
def test_a_key_pasted_into_any_field_is_refused_without_echo(tmp_path, key, value):
    from medcomp.sweep import nested

    path = tmp_path / "p.yaml"
    import yaml

    raw = {"run_name": "x", "world": "real"}
    section, _, name = key.partition(".")
    raw.update(nested(key, value) if name else {key: value})
    path.write_text(yaml.safe_dump(raw))
    if value == "x":
        load_params(path)  # an ordinary value passes
        return
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert value not in str(refused.value) and key in str(refused.value) and "API key" in str(refused.value)


def test_credentials_in_the_judge_url_are_refused_without_echo(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("run_name: x\nworld: real\njudge: {base_url: 'http://user:secretpw@localhost:8000/v1'}\n")
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert "secretpw" not in str(refused.value) and "credentials" in str(refused.value)


@pytest.mark.parametrize("section, body, expected", [
    ("judge", "{figure5_item: 99999}", "judge.figure5_item is 99999, but the test set has 117"),
    ("benchmark", "{example_index: 117}", "benchmark.example_index is 117"),
    ("pruning", "{example_index: 39}", "pruning.example_index is 39"),
    ("benchmark", "{variants: [pruned-7]}", "must include 'finetuned'"),
])
def test_indices_outside_the_test_set_fail_at_check(tmp_path, section, body, expected):
    path = tmp_path / "p.yaml"
    path.write_text(f"run_name: x\nworld: real\n{section}: {body}\n")
    with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_params(path)


def test_a_section_check_says_what_is_wrong_without_dumping_the_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("run_name: x\nworld: real\nquantization: {group_size: 48, calibration_size: 8}\n")
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert "group_size must be 32, 64 or 128" in str(refused.value) and "calibration_size" not in str(refused.value)


def test_changing_how_often_training_logs_keeps_its_checkpoints(tmp_path, synthetic_root):
    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG
    from medcomp.params import FinetuneParams
    from medcomp.training import _checkpoints_for

    examples = build_conversations(scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES).images[:2])
    checkpoints = _checkpoints_for(tmp_path, ["model"], examples, FinetuneParams(logging_steps=5))
    (checkpoints / "checkpoint-10").mkdir()
    _checkpoints_for(tmp_path, ["model"], examples, FinetuneParams(logging_steps=1, save_steps=7))
    assert (checkpoints / "checkpoint-10").exists(), "a logging-only change wiped the checkpoints"
    _checkpoints_for(tmp_path, ["model"], examples, FinetuneParams(learning_rate=1e-3))
    assert not (checkpoints / "checkpoint-10").exists(), "a change that alters training must start afresh"


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys; a params file with `seed: 0` then `seed: 7` would run seed 7."""
    path = tmp_path / "p.yaml"
    path.write_text("run_name: x\nseed: 0\nruntime:\n  threads: 2\nseed: 7\n")
    with pytest.raises(ParamsError, match=r"key 'seed' appears twice \(lines 2 and 5\)"):
        load_params(path)
    path.write_text("run_name: x\nruntime:\n  threads: 2\n  threads: 4\n")  # nested too
    with pytest.raises(ParamsError, match=r"key 'threads' appears twice \(lines 3 and 4\)"):
        load_params(path)
    path.write_text("run_name: x\nworld: real\nseed: 7\nruntime:\n  threads: 2\n")
    assert load_params(path).seed == 7


def test_check_refuses_a_data_root_without_dermnets_layout_before_any_work(tmp_path, synthetic_root, capsys):
    import shutil

    from medcomp.__main__ import main

    def check(root) -> int:
        path = tmp_path / "real.yaml"
        path.write_text(f"run_name: x\nworld: real\ndata:\n  root: {root}\n")
        return main(["check", str(path)])

    assert check(tmp_path / "nonexistent" / "dermnet") == 2
    assert "nonexistent/dermnet does not exist" in capsys.readouterr().err
    assert check(synthetic_root) == 0  # the generated data has DermNet's layout
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_root, broken)
    shutil.rmtree(broken / "test")
    assert check(broken) == 2 and "has no test/ folder" in capsys.readouterr().err
    shutil.copytree(synthetic_root / "test", broken / "test")
    folder = next(p for p in sorted((broken / "train").iterdir()) if p.is_dir())
    shutil.rmtree(folder)
    assert check(broken) == 2 and f"under train/ (looked for ['{folder.name}'" in capsys.readouterr().err


def test_a_run_with_a_missing_data_root_stops_before_any_notebook(tmp_path):
    from medcomp.runner import run_pipeline

    path = tmp_path / "real.yaml"
    path.write_text("run_name: x\nworld: real\ndata:\n  root: /nonexistent/dermnet\n")
    with pytest.raises(ParamsError, match="data.root /nonexistent/dermnet does not exist"):
        run_pipeline(path, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
