"""07's ``openai`` backend against a real OpenAI-compatible server: ``transformers serve`` (FastAPI, in the lock),
on loopback, serving a tiny Llama whose every reply is fixed by its weights.

How the reply is forced: a 3-token vocabulary (unknown, end, and the whole reply as one word-level token);
the decoder layers are zeroed so each position's hidden state is its token's embedding, and the lm_head
maps "any token but the reply" to the reply and "the reply" to the end. Greedy decoding therefore answers
every prompt with exactly the reply, then stops: ``{"Rating": 3}`` for the paper's JSON, a sentence
without a rating for the retry path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medcomp.judging import JudgeItem, JudgementCache, OpenAIJudge, judge_items

pytestmark = pytest.mark.slow
KEY_ENV = "MEDCOMP_TEST_JUDGE_KEY"
KEY = "test-key-0123456789"


def fixed_reply_model(target: Path, reply: str) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, reply: 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = LlamaConfig(vocab_size=3, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=8192, eos_token_id=1, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            parameter.zero_()  # attention and MLP add nothing: the residual stream is the embedding
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
        embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
        embedding.zero_(), head.zero_()
        embedding[0, 1] = embedding[1, 1] = 1  # every prompt token points one way...
        embedding[2, 0] = 1  # ...the reply token the other
        head[2, 1] = head[1, 0] = 50  # prompt -> reply, reply -> end
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=1, do_sample=False)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``transformers serve MODEL`` on a free loopback port: waits for /health, stops by its PID."""

    def __init__(self, model: Path):
        self.port = _free_port()
        command = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1", "--port", str(self.port), str(model)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.process.returncode}: {self.process.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError("transformers serve did not become healthy in 180 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class RecordingProxy:
    """Forwards /v1/chat/completions to the server and records each request's Authorization header and status."""

    def __init__(self, upstream: str):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(upstream + self.path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json", "Authorization": self.headers.get("Authorization", "")})
                with urllib.request.urlopen(request, timeout=120) as response:
                    data, status = response.read(), response.status
                owner.requests.append({"authorization": self.headers.get("Authorization"), "status": status})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge_through_server(tmp_path, monkeypatch, reply: str, answers: list[str]):
    monkeypatch.setenv(KEY_ENV, KEY)
    model = fixed_reply_model(tmp_path / "model", reply)
    server = Server(model)
    proxy = RecordingProxy(f"http://127.0.0.1:{server.port}")
    try:
        judge = OpenAIJudge(str(model), proxy.url, api_key_env=KEY_ENV, timeout=60, max_retries=0, concurrency=2)
        items = [JudgeItem("v", f"item{i}", "What is shown?", answer, "psoriasis", "psoriasis", "diagnosis") for i, answer in enumerate(answers)]
        judgements = judge_items(judge, items, JudgementCache(tmp_path / "cache.jsonl"), parse_retries=2, progress=False)
    finally:
        proxy.close()
        server.stop()
    assert server.process.returncode is not None  # stopped
    return judgements, proxy.requests


def test_a_reply_in_the_papers_json_is_read_from_a_real_server(tmp_path, monkeypatch):
    judgements, requests = _judge_through_server(tmp_path, monkeypatch, '{"Rating": 3}', ["psoriasis", "eczema", "acne vulgaris"])
    assert [(j.status, j.rating, j.attempts) for j in judgements] == [("valid", 3, 1)] * 3
    assert len(requests) == 3 and {r["authorization"] for r in requests} == {f"Bearer {KEY}"} and {r["status"] for r in requests} == {200}
    assert KEY not in (tmp_path / "cache.jsonl").read_text()  # the key reaches the server's header, never the cache


def test_a_reply_without_a_rating_is_retried_then_recorded_invalid(tmp_path, monkeypatch):
    judgements, requests = _judge_through_server(tmp_path, monkeypatch, "This_is_psoriasis.", ["psoriasis"])
    assert [(j.status, j.rating, j.attempts, j.problem) for j in judgements] == [("invalid", None, 3, "no rating found")]
    assert len(requests) == 3  # the question, then two follow-ups showing the judge its reply
