"""``lora-jax serve``: a real server process answering concurrent HTTP requests for three
adapters and the base model, each answer equal to ``lora-jax generate``'s; its 4xx answers;
a clean stop on SIGTERM. And the batching worker's parts, in process, without a model."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess

import pytest

from _llm import needs_smollm2
from _many import write_smollm2_adapters
from _utils import cli_process, request, run_cli, serving
from lora_jax.app import serve

BASE = "smollm2-135m-instruct"
CHAT = ["What is the capital of France?", "Name a color."]
RAW = ["The capital of France is", "def add(a, b):"]
TOKENS = 8


@pytest.fixture(scope="module")
def model():
  from lora_jax.app import causal
  return causal.load_model(BASE)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model) -> dict[str, str]:
  return write_smollm2_adapters(tmp_path_factory.mktemp("adapters"), model)


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
  """``(url, process, stderr file)`` of a running ``lora-jax serve`` on a free port."""
  err = tmp_path_factory.mktemp("serve") / "stderr.txt"
  specs = [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
  with serving([*specs, "--port", "0", "--batch-wait-ms", "300"], err) as (url, proc):
    yield url, proc, err


def parse_generate(out: str, names, prompts) -> dict:
  """``{(name, prompt): text}`` from ``lora-jax generate --quiet``'s ``[NAME] PROMPT\\n->
  TEXT\\n\\n`` blocks (adapter by adapter, prompt by prompt)."""
  heads = [(n, p, f"{f'[{n}] ' if n else ''}{p}\n-> ") for n in names for p in prompts]
  texts, at = {}, 0
  for i, (name, prompt, head) in enumerate(heads):
    assert out.startswith(head, at), (head, out[at:at + 200])
    start = at + len(head)
    at = out.index(heads[i + 1][2], start) if i + 1 < len(heads) else len(out)
    assert out[at - 2:at] == "\n\n", out[start:at]
    texts[(name, prompt)] = out[start:at - 2]
  return texts


@needs_smollm2
def test_models_and_health_list_the_base_and_every_adapter(server, adapters):
  url, _, _ = server
  status, models = request(url, "/v1/models")
  assert status == 200 and models["object"] == "list"
  assert [m["id"] for m in models["data"]] == [BASE, *adapters]
  assert [m["parent"] for m in models["data"]] == [None] + [BASE] * len(adapters)
  status, health = request(url, "/health")
  assert status == 200 and health["status"] == "ok" and health["adapters"] == list(adapters)


@needs_smollm2
def test_concurrent_requests_are_batched_and_match_generate(server, adapters, model):
  """Chat and completions, three adapters and the base, all at once: each answer is what
  ``lora-jax generate`` prints (a process for the adapters' chat answers, the same
  ``generate_mixed`` in this process for the rest), and several share a batch."""
  from lora_jax.app import causal

  url, _, _ = server
  names = [*adapters, None]
  cli = subprocess.Popen(
      cli_process("generate", BASE, *[a for n, p in adapters.items() for a in ("--adapter",
                                                                            f"{n}={p}")],
                  *[a for p in CHAT for a in ("--prompt", p)], "--max-new-tokens", str(TOKENS),
                  "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  asks = [(name, "chat", p) for name in names for p in CHAT]
  asks += [(name, "text", p) for name in names for p in RAW]

  def ask(name, kind, prompt):
    body = {"model": name or BASE, "max_tokens": TOKENS}
    if kind == "chat":
      return request(url, "/v1/chat/completions",
                     {**body, "messages": [{"role": "user", "content": prompt}]})
    return request(url, "/v1/completions", {**body, "prompt": prompt})

  try:
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
      answers = list(pool.map(lambda a: ask(*a), asks))
    out, err = cli.communicate(timeout=600)
  finally:
    if cli.poll() is None:
      cli.kill()
      cli.communicate()

  bank = causal.load_bank(model, adapters)
  ids = [causal.prompt_ids(model.tokenizer, [p], raw=kind == "text")[0] for _, kind, p in asks]
  expected = causal.generate_mixed(model, bank, ids, [n for n, _, _ in asks],
                                   max_new_tokens=TOKENS)
  for (name, kind, prompt), (status, answer), tokens, row in zip(asks, answers, expected.tokens,
                                                                 ids):
    assert status == 200, answer
    choice = answer["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    assert answer["model"] == (name or BASE)
    assert answer["object"] == ("chat.completion" if kind == "chat" else "text_completion")
    assert text == model.tokenizer.decode(tokens), (name, prompt)
    stopped = tokens[-1] in model.tokenizer.stop_ids
    assert choice["finish_reason"] == ("stop" if stopped else "length")
    assert answer["usage"] == {"prompt_tokens": len(row), "completion_tokens": len(tokens),
                               "total_tokens": len(row) + len(tokens)}
  texts = {(n, p): a[1]["choices"][0]["message"]["content"]
           for (n, kind, p), a in zip(asks, answers) if kind == "chat"}
  assert len(set(texts.values())) > len(CHAT)  # the adapters change the answers
  assert cli.returncode == 0, err
  printed = parse_generate(out, adapters, CHAT)
  assert printed == {key: texts[key] for key in printed}
  _, health = request(url, "/health")
  assert health["requests"] >= len(asks) and health["batches"] < health["requests"]
  assert health["largest_batch"] > 1


BAD = [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     404, "available models: smollm2-135m-instruct, qv, mlp, attn"),
    ("/v1/completions", b'{"model": "qv", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", {"model": "qv", "prompt": "hello " * 9000, "max_tokens": 4}, 400,
     "the prompt has 9001 tokens"),
    ("/v1/chat/completions", {"model": "qv"}, 400, "missing required field 'messages'"),
    ("/v1/chat/completions", {"model": "qv", "messages": [{"role": "user"}]}, 400,
     "messages[0]: expected a string 'content'"),
    ("/v1/completions", {"model": "qv", "prompt": "hi", "max_tokens": 0}, 400,
     "'max_tokens' must be between 1 and 512"),
    ("/v1/completions", {"model": "qv", "prompt": 7}, 400, "'prompt' must be a string"),
    ("/v1/completions", {"model": "qv", "prompt": "hi", "temperature": -1}, 400,
     "temperature must be >= 0"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"model": "qv", "prompt": "hi", "seed": 2 ** 64}, 400,
     "'seed' must be an integer from 0 to 2**63 - 1"),
    ("/v1/embeddings", {"model": "qv"}, 404, "no such path '/v1/embeddings'"),
]


@needs_smollm2
@pytest.mark.parametrize("path,body,status,message", BAD)
def test_bad_requests_are_json_errors(server, path, body, status, message):
  url, _, _ = server
  if isinstance(body, bytes):
    got, answer = request(url, path, data=body)
  else:
    got, answer = request(url, path, body)
  assert got == status and message in answer["error"]["message"], answer
  assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"]


@needs_smollm2
def test_wrong_method_is_405(server):
  url, _, _ = server
  status, answer = request(url, "/v1/completions")  # GET
  assert status == 405 and "use POST" in answer["error"]["message"]
  status, answer = request(url, "/v1/models", {"model": "qv"})  # POST
  assert status == 405 and "use GET" in answer["error"]["message"]


@needs_smollm2
def test_sigterm_stops_cleanly(server):
  """Last in this file: the server answers SIGTERM by stopping, exit code 0."""
  url, proc, err = server
  assert request(url, "/health")[0] == 200
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(120) == 0
  stderr = err.read_text()
  assert "Traceback" not in stderr and "lora-jax serve: stopped after" in stderr
  assert proc.stdout.read() == ""  # the ready line was the only output


# ----------------------------------------------------------------------- without a process


def test_bad_settings_and_adapters_are_one_line_and_exit_2(capsys, tmp_path):
  folder = str(tmp_path)  # checked before any adapter is read
  for argv, message in [(["--adapter", f"a={folder}", "--max-batch", "0"],
                         "--max-batch must be >= 1"),
                        (["--adapter", f"a={folder}", "--adapter", f"a={folder}"], "given twice"),
                        (["--adapter", f"{BASE}={folder}"], "is the model's")]:
    code, out, err = run_cli(capsys, "serve", "--port", "0", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err


@needs_smollm2
def test_an_adapter_that_does_not_load_is_one_line_and_exit_2(capsys, tmp_path):
  code, out, err = run_cli(capsys, "serve", "--port", "0", "--adapter", f"x={tmp_path}")
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
  assert err.startswith("lora-jax serve: ") and str(tmp_path) in err


def _job(max_tokens=4, n=3, temperature=0.0):
  from lora_jax.generate import Sampling
  return serve.Job(list(range(1, n + 1)), None, max_tokens, Sampling(temperature=temperature))


def test_groups_share_sampling_and_fit_the_context():
  jobs = [_job(), _job(temperature=1.0), _job(), _job(max_tokens=8, n=5)]
  assert serve.groups(jobs, context=100) == [[jobs[0], jobs[2], jobs[3]], [jobs[1]]]
  # 5 prompt tokens + 8 new tokens do not fit 12 with the others: a group of their own
  assert serve.groups(jobs, context=12) == [[jobs[0], jobs[2]], [jobs[1]], [jobs[3]]]
  assert [serve.padded_size(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
  assert [serve.padded_size(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


def test_the_worker_answers_500_for_a_failed_batch_and_keeps_going():
  calls = []

  def decode(ids, names, *, max_new_tokens, sampling, seed):
    calls.append((len(ids), max_new_tokens))
    if len(calls) == 1:
      raise RuntimeError("boom")
    return type("Generation", (), {"tokens": [[7, 8, 9, 2]] * len(ids)})()

  batcher = serve.Batcher(decode, stop_ids=(2,), context=100, max_batch=4, max_queue=8,
                          wait_s=0.0)
  failed, done = _job(), [_job(max_tokens=2), _job(max_tokens=4)]
  batcher.submit(failed)
  batcher.start()
  assert failed.done.wait(30) and failed.error.status == 500 and "boom" in failed.error.message
  for job in done:
    batcher.submit(job)
  assert all(job.done.wait(30) for job in done)
  assert [job.tokens for job in done] == [[7, 8], [7, 8, 9, 2]]  # each cut to its max_tokens
  assert calls[-1] == (2, 16)  # max_tokens 4 decodes 16 (a power of two >= 16: few shapes)
  batcher.stop()
  with pytest.raises(serve.HTTPError, match="shutting down"):
    batcher.submit(_job())


def test_the_decode_budget_is_a_power_of_two_within_the_context():
  batcher = serve.Batcher(None, stop_ids=(), context=30, max_batch=4, max_queue=8, wait_s=0.0)
  assert batcher._budget([_job(max_tokens=4)]) == 16
  assert batcher._budget([_job(max_tokens=17), _job(max_tokens=3)]) == 27  # 32 > 30 - 3
  assert batcher._budget([_job(max_tokens=20, n=10)]) == 20  # the context leaves exactly 20


def test_a_full_queue_answers_503():
  batcher = serve.Batcher(None, stop_ids=(), context=100, max_batch=1, max_queue=1, wait_s=0.0)
  batcher.submit(_job())
  with pytest.raises(serve.HTTPError) as error:
    batcher.submit(_job())
  assert error.value.status == 503 and error.value.code == "queue_full"
  batcher.stop()  # never started: the queued job is answered 503
