"""End to end: the real `dsv2 serve` process on a tiny HF checkpoint, driven by the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import V2_STYLE, make_hf_checkpoint

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
                 "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
                 "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "serving many requests at once with a paged latent cache"] * 20


def write_tokenizer(path):
    """A 160-token BPE (ids 0/1/2 = unk/bos/eos, as the tiny config expects), trained offline."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=V2_STYLE["vocab_size"],
                                                        special_tokens=["<unk>", BOS, EOS]))
    assert tok.get_vocab_size() <= V2_STYLE["vocab_size"]
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE}))


def http(method, url, body=None, timeout=10):
    """(status, response) with the stdlib client; the caller closes the response."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        return e.code, e
    return resp.status, resp


def get_text(url) -> str:
    status, resp = http("GET", url)
    with resp:
        return resp.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, openai client) of one server process shared by every test here."""
    path = tmp_path_factory.mktemp("serve_ckpt")
    make_hf_checkpoint(path, V2_STYLE)
    write_tokenizer(path)
    port = free_port()
    log = open(path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv2_jax.cli", "serve", "--checkpoint", str(path), "--port", str(port),
         "--served-model-name", "tiny", "--dtype", "float32", "--page-size", "16", "--num-pages", "48",
         "--max-running", "2", "--max-waiting", "2", "--max-tokens-per-step", "16", "--max-model-len", "96"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):  # bounded: 600 s (start-up compiles every step shape; slow on a loaded machine)
            if proc.poll() is not None:
                pytest.fail(f"server exited: {(path / 'server.log').read_text()[-2000:]}")
            try:
                if http("GET", f"{base}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not come up in 600 s")
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def metric(base, name) -> float:
    for line in get_text(f"{base}/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def wait_idle(base):
    for _ in range(100):  # bounded: 20 s
        if metric(base, "dsv2_cache_pages_used") == 0 and metric(base, "dsv2_requests_running") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("pages still in use")


def test_completions_stream_and_stop(server):
    base, client = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert full.usage.prompt_tokens >= 2 and 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert choice.finish_reason == ("length" if full.usage.completion_tokens == 12 else "stop")
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # greedy: the same text, streamed
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # Token-id prompts work too, and a stop string cuts the text before it.
    ids = client.completions.create(model="tiny", prompt=[1, 40, 41, 42], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 4
    text = choice.text
    if len(text.strip()) >= 4:
        stop = text.strip()[2:4]
        cut = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible.
    a, b = (client.completions.create(model="tiny", prompt="the fox", max_tokens=8, temperature=0.9, top_p=0.9,
                                      seed=11).choices[0].text for _ in range(2))
    assert a == b
    wait_idle(base)


def test_chat_completions(server):
    base, client = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you?"}]
    out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    wait_idle(base)


def test_errors_are_openai_style(server):
    base, client = server
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=5.0)
    with pytest.raises(openai.BadRequestError, match="maximum length 96"):
        client.completions.create(model="tiny", prompt=[5] * 90, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="tiny", prompt=[5, 100000], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model="tiny", prompt="hi", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    status, resp = http("POST", f"{base}/v1/chat/completions", {"model": "tiny", "messages": []})
    with resp:
        assert status == 400 and json.loads(resp.read())["error"]["type"] == "invalid_request_error"
    assert json.loads(get_text(f"{base}/health")) == {"status": "ok"}


def test_disconnect_frees_pages_and_overload_gives_429(server):
    base, client = server
    status, resp = http("POST", f"{base}/v1/completions", {"model": "tiny", "prompt": [1] + [7] * 40,
                                                           "max_tokens": 50, "temperature": 0, "stream": True},
                        timeout=60)
    with resp:
        assert status == 200 and resp.readline().startswith(b"data: ")
    wait_idle(base)  # the stream was dropped after one event: its pages are back
    assert metric(base, 'dsv2_requests_finished_total{reason="abort"}') >= 1  # aborted, not run to the end

    def one(_):
        try:
            client.completions.create(model="tiny", prompt=[1, 9, 9], max_tokens=40, temperature=0)
            return 200
        except openai.RateLimitError:
            return 429
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(12)))
    assert codes.count(429) >= 1 and codes.count(200) >= 4  # 2 running + 2 waiting always fit
    wait_idle(base)
    text = get_text(f"{base}/metrics")
    for name in ("dsv2_requests_waiting", "dsv2_cache_usage_ratio", "dsv2_generation_tokens_per_second",
                 "dsv2_time_to_first_token_seconds_bucket", "dsv2_time_per_output_token_seconds_bucket"):
        assert name in text
    assert metric(base, "dsv2_generation_tokens_total") > 0


def test_serve_cli_rejects_missing_checkpoint(tmp_path, capsys):
    from dsv2_jax.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
