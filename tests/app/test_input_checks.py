"""Bad input names itself (issue 27, cases 7-9): training data with lone surrogates, bad roles,
non-string content or bytes that are not UTF-8 (file and line); integer and number options of
``generate``, ``serve`` and ``train`` out of range (the option); a ``--data`` or ``--model``
path that is the wrong kind of thing (what it is, what was expected); and the server's 400s."""

from __future__ import annotations

import json
import subprocess

import jax
import pytest

import lora_jax
from _llm import needs_smollm2, tiny_llama_folder, write_jsonl
from _utils import cli_process, request, run_cli, serving
from lora_jax.app import causal, data, options

HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def _one_line(code, out, err):
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
  assert "Traceback" not in err and "unexpected" not in err, err
  return err


def _write_lines(path, lines) -> str:
  """``lines`` as they are (JSON escapes kept: ``"\\ud800"`` stays six characters)."""
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def tok():
  from lora_jax.models import chat
  return chat.load_chat_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return str(tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "model"))


# ----------------------------------------------------------------------- the chat/text reader


LONE = '{"messages": [{"role": "user", "content": "hi \\ud800"}, ' \
       '{"role": "assistant", "content": "yo"}]}'

BAD_CHAT = [
    ([json.dumps({"messages": HELLO}), LONE], "chat",
     r"bad\.jsonl line 2: messages\[0\]\.content holds a lone surrogate \(\\ud800\)"),
    ([json.dumps({"text": "ok"}), json.dumps({"text": "x \udc00 y"})], "text",
     r"bad\.jsonl line 2: text holds a lone surrogate \(\\udc00\)"),
    ([json.dumps({"messages": [{"role": "user", "content": 5}, HELLO[1]]})], "chat",
     r"bad\.jsonl line 1: messages\[0\] needs a string \"content\", got 5\."),
    ([json.dumps({"messages": [HELLO[0], {"content": "yo"}]})], "chat",
     r"bad\.jsonl line 1: messages\[1\] has no \"role\"; give one of system, user, assistant"),
    ([json.dumps({"messages": HELLO}), json.dumps({"messages": [
        {"role": "robot", "content": "beep"}, HELLO[1]]})], "chat",
     r"bad\.jsonl line 2: messages\[0\] has role 'robot'; a chat row's roles are system, "
     r"user, assistant"),
    ([json.dumps({"prompt": ["hi"], "response": "yo"})], "chat",
     r"bad\.jsonl line 1: \"prompt\" must be a string, got \[\"hi\"\]\."),
]


@needs_smollm2
@pytest.mark.parametrize("lines,task,message", BAD_CHAT)
def test_a_bad_chat_or_text_row_names_its_file_and_line(tmp_path, tok, lines, task, message):
  path = _write_lines(tmp_path / "bad.jsonl", lines)
  with pytest.raises(ValueError, match=message):
    causal.read_examples(path, tok, task=task, max_length=64)


@needs_smollm2
def test_a_file_that_is_not_utf8_names_the_line_and_byte_of_its_first_bad_byte(tmp_path, tok):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps({"messages": HELLO}).encode() + b"\n"
                   + '{"text": "caf\xe9"}\n'.encode("latin-1"))
  offset = len(json.dumps({"messages": HELLO})) + 1 + len('{"text": "caf')
  with pytest.raises(ValueError, match=rf"latin1\.jsonl: not UTF-8 text \(invalid continuation "
                                       rf"byte\); save it as UTF-8\. The first bad byte, 0xe9, "
                                       rf"is on line 2 \(byte offset {offset}\)\."):
    causal.read_examples(str(path), tok, task="text", max_length=64)


def test_a_data_folder_is_named_a_folder(tmp_path):
  with pytest.raises(ValueError, match=r"data file .* is a folder; expected a \.jsonl file "
                                       r"\(or a \.txt file for --task text\)\."):
    causal.read_examples(str(tmp_path), None, task="chat", max_length=64)


# ----------------------------------------------------------------------- the classify reader


def test_a_lone_surrogate_in_a_classify_jsonl_names_its_line(tmp_path):
  path = _write_lines(tmp_path / "c.jsonl", ['{"sentence": "good", "label": 1}', "",
                                             '{"sentence": "b\\udfffd", "label": 0}'])
  with pytest.raises(ValueError, match=r"c\.jsonl: line 3: sentence holds a lone surrogate "
                                       r"\(\\udfff\)"):
    data.read_examples(path)


def test_a_classify_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
  path = tmp_path / "latin1.csv"
  path.write_bytes("sentence,label\ngood,1\ncaf\xe9,0\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8 text \(invalid continuation "
                                       r"byte\); save it as UTF-8\. The first bad byte, 0xe9, is "
                                       r"on line 3 \(byte offset 25\)\."):
    data.read_examples(path)


# ----------------------------------------------------------------------- --model paths


def test_a_model_path_that_is_not_a_model_says_what_it_is(tmp_path):
  file = tmp_path / "passwd"
  file.write_text("root:x:0:0\n")
  with pytest.raises(ValueError, match=r"model '.*passwd' is a file that is not a \.gguf; "
                                       r"expected smollm2-135m-instruct \(the bundled GGUF\), a "
                                       r"\.gguf file or a Hugging Face Llama folder "
                                       r"\(config\.json, model\.safetensors, "
                                       r"tokenizer\.json\)\."):
    causal.load_model(str(file))
  with pytest.raises(ValueError, match=r"model '.*' is a folder without config\.json; expected "
                                       r"smollm2-135m-instruct"):
    causal.load_model(str(tmp_path))
  (tmp_path / "odd.gguf").mkdir()
  with pytest.raises(ValueError, match=r"model '.*odd\.gguf' is a folder, not a \.gguf file"):
    causal.load_model(str(tmp_path / "odd.gguf"))
  with pytest.raises(ValueError, match=r"model '.*nothing' not found: expected "):
    causal.load_model(str(tmp_path / "nothing"))  # as before


# ----------------------------------------------------------------------- train's command line


@needs_smollm2
def test_train_names_the_file_and_line_of_a_bad_row(tmp_path, tiny, capsys):
  robot = write_jsonl(tmp_path / "robot.jsonl", [{"messages": HELLO}, {"messages": [
      {"role": "robot", "content": "beep"}, HELLO[1]]}])
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(b'{"prompt": "caf\xe9", "response": "yo"}\n')
  lone = _write_lines(tmp_path / "lone.jsonl", [LONE])
  for file, message in [(robot, "robot.jsonl line 2: messages[0] has role 'robot'"),
                        (latin, "latin.jsonl: not UTF-8 text (invalid continuation byte); "
                                "save it as UTF-8. The first bad byte, 0xe9, is on line 1"),
                        (lone, "lone.jsonl line 1: messages[0].content holds a lone surrogate"),
                        (tmp_path, "is a folder; expected a .jsonl file")]:
    err = _one_line(*run_cli(capsys, "train", "--task", "chat", "--model", tiny, "--data",
                             str(file), "--out", str(tmp_path / "r")))
    assert message in err, err
  assert not (tmp_path / "r").exists()


def test_train_names_a_model_path_that_is_not_a_model(tmp_path, capsys):
  data_file = write_jsonl(tmp_path / "d.jsonl", [{"messages": HELLO}])
  passwd = tmp_path / "passwd"
  passwd.write_text("root:x:0:0\n")
  err = _one_line(*run_cli(capsys, "train", "--task", "chat", "--model", str(passwd), "--data",
                           str(data_file), "--out", str(tmp_path / "r")))
  assert "passwd' is a file that is not a .gguf; expected smollm2-135m-instruct" in err, err


@pytest.mark.parametrize("argv,message", [
    (["--seed", str(10 ** 23)], "--seed must be an integer from 0 to 2**31 - 1, got "
                                "100000000000000000000000."),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**31 - 1, got -1."),
    (["--rank", str(10 ** 23)], "--rank must be an integer <= 2**31 - 1, got "),
    (["--steps", str(2 ** 31)], "--steps must be an integer <= 2**31 - 1, got 2147483648."),
    (["--max-train", str(10 ** 23)], "--max-train must be an integer <= 2**31 - 1"),
    (["--eval-examples", str(10 ** 23)], "--eval-examples must be an integer <= 2**31 - 1"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf."),
    (["--epochs", "1e300"], "--epochs must be a number <= 1000000, got 1e+300."),
    (["--alpha", "1e999"], "--alpha must be a finite number, got inf."),
    (["--task", "chat", "--max-new-tokens", str(10 ** 23)],
     "--max-new-tokens must be an integer <= 2**31 - 1"),
    (["--task", "chat", "--max-length", str(10 ** 23)],
     "--max-length must be an integer <= 2**31 - 1"),
])
def test_train_integer_and_number_options_are_bounded(tmp_path, capsys, argv, message):
  missing = ["--data", str(tmp_path / "none.jsonl")]  # checked after the options
  missing += ["--model", str(tmp_path / "none")] if "chat" in argv else []
  err = _one_line(*run_cli(capsys, "train", *argv, *missing, "--out", str(tmp_path / "r")))
  assert message in err, err
  assert not (tmp_path / "r").exists()


def test_option_bounds_at_the_library_level():
  from lora_jax.app.classify import ClassifyOptions
  with pytest.raises(options.OptionError, match=r"^seed must be an integer from 0 to "
                                                r"2\*\*31 - 1, got 4294967296\.$"):
    ClassifyOptions(seed=2 ** 32)
  with pytest.raises(options.OptionError, match=r"^lr must be a finite number, got inf\.$"):
    ClassifyOptions(lr=float("inf"))
  assert ClassifyOptions(seed=2 ** 31 - 1, steps=2 ** 31 - 1).seed == 2 ** 31 - 1


# ----------------------------------------------------------------------- generate and serve flags


@pytest.mark.parametrize("argv,message", [
    (["--seed", str(10 ** 23)], "argument --seed: must be an integer from 0 to 2**63 - 1, got "
                                "100000000000000000000000"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**63 - 1, got -1"),
    (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer from 1 to "
                                "2**31 - 1, got 0"),
    (["--max-new-tokens", str(2 ** 31)], "argument --max-new-tokens: must be an integer from 1 "
                                         "to 2**31 - 1, got 2147483648"),
    (["--top-k", "0"], "argument --top-k: must be an integer from 1 to 2**31 - 1, got 0"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number, got 'inf'"),
    (["--temperature", "1e999"], "argument --temperature: must be a finite number, got '1e999'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got 'nan'"),
    (["--temperature", "2.5"], "argument --temperature: must be a number from 0 to 2, got 2.5"),
    (["--temperature", "-0.5"], "argument --temperature: must be a number from 0 to 2, got "
                                "-0.5"),
    (["--temperature", "hot"], "argument --temperature: expected a number, got 'hot'"),
    (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1], got 1.5"),
    (["--top-p", "nan"], "argument --top-p: must be a finite number, got 'nan'"),
    (["--prompt", "caf\udce9"], "argument --prompt: not UTF-8 text (byte 0xe9 at character 3)"),
])
def test_generate_options_are_bounded(capsys, tmp_path, argv, message):
  model = str(tmp_path / "none")  # loaded after the options are checked
  err = _one_line(*run_cli(capsys, "generate", model, "--prompt", "hi", *argv))
  assert err.startswith("lora-jax generate: ") and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be <= 65535, got 70000."),
    (["--port", "-1"], "--port must be >= 0, got -1."),
    (["--max-batch", str(10 ** 23)], "--max-batch must be <= 1024, got "),
    (["--max-queue", str(10 ** 23)], "--max-queue must be <= 2**20, got "),
    (["--max-new-tokens-limit", str(2 ** 31)], "--max-new-tokens-limit must be <= 2**31 - 1, "
                                               "got 2147483648."),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a finite number, got nan."),
    (["--batch-wait-ms", "inf"], "--batch-wait-ms must be a finite number, got inf."),
    (["--batch-wait-ms", "1e9"], "--batch-wait-ms must be <= 60000, got 1000000000.0."),
])
def test_serve_options_are_bounded(capsys, tmp_path, argv, message):
  err = _one_line(*run_cli(capsys, "serve", "--port", "0", "--adapter", f"a={tmp_path}",
                           "--model", str(tmp_path / "none"), *argv))
  assert err.startswith("lora-jax serve: ") and message in err, err


def test_out_of_range_options_fail_in_a_real_process_without_a_traceback(tmp_path):
  for argv, message in [(["generate", str(tmp_path / "none"), "--prompt", "hi", "--seed",
                          str(10 ** 23)], "argument --seed: must be an integer from 0 to"),
                        (["serve", "--adapter", f"a={tmp_path}", "--port", "70000"],
                         "--port must be <= 65535, got 70000.")]:
    done = subprocess.run(cli_process(*argv), capture_output=True, text=True, timeout=300)
    _one_line(done.returncode, done.stdout, done.stderr)
    assert message in done.stderr, done.stderr


def test_the_argparse_types():
  assert options.integer_in(0, 65535)("8000") == 8000
  assert options.finite_in(0, 1, low_open=True)("1") == 1.0
  assert options.prompt_text("café") == "café"
  with pytest.raises(Exception, match=r"^must be an integer from 0 to 65535, got 65536$"):
    options.integer_in(0, 65535)("65536")
  with pytest.raises(Exception, match=r"^must be a finite number, got '-inf'$"):
    options.finite_in(0, 2)("-inf")


# ----------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
  """The URL of a running ``lora-jax serve`` over the tiny model and one adapter."""
  root = tmp_path_factory.mktemp("serve")
  model = causal.load_model(tiny)
  config = lora_jax.LoraConfig(targets="q_proj|v_proj", rank=2, alpha=4.0)
  tree = lora_jax.init(config, model.params, key=jax.random.key(0), uses=causal.analyze(model))
  lora_jax.checkpoint.save(root / "a", 0, tree, config=config, base=model.params)
  with serving(["--model", tiny, "--adapter", f"a={root / 'a'}", "--port", "0"],
               root / "stderr.txt", ready="serving on http://") as (url, _):
    yield url


BAD_REQUESTS = [
    ("/v1/completions", '{"model": "a", "prompt": "hi \\ud800"}',
     "'prompt' holds a lone surrogate (\\ud800)"),
    ("/v1/chat/completions",
     '{"model": "a", "messages": [{"role": "user", "content": "\\udc00"}]}',
     "'messages[0].content' holds a lone surrogate (\\udc00)"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "temperature": Infinity}',
     "'temperature' must be a number from 0 to 2, got inf"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "temperature": 1e999}',
     "'temperature' must be a number from 0 to 2, got inf"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "temperature": NaN}',
     "'temperature' must be a number from 0 to 2, got nan"),
    ("/v1/chat/completions", '{"model": "a", "messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": 2.5}',
     "'temperature' must be a number from 0 to 2, got 2.5"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "top_k": 4294967296}',
     "'top_k' must be an integer from 1 to 2**31 - 1, got 4294967296"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "seed": 1' + "0" * 5000 + "}",
     "the body holds an integer of over 4300 digits"),
]


@needs_smollm2
@pytest.mark.parametrize("path,body,message", BAD_REQUESTS,
                         ids=["lone-prompt", "lone-content", "temperature-infinity",
                              "temperature-1e999", "temperature-nan", "temperature-2.5",
                              "top-k-2**32", "seed-5000-digits"])
def test_the_server_answers_a_bad_field_with_400(server, path, body, message):
  status, answer = request(server, path, data=body.encode())
  assert status == 400 and message in answer["error"]["message"], (body, answer)
  assert answer["error"]["type"] == "invalid_request_error", answer
  assert answer["error"]["code"] in ("invalid_value", "invalid_json"), answer


@needs_smollm2
def test_the_server_keeps_serving_and_takes_the_hottest_temperature(server):
  status, answer = request(server, "/v1/completions", {"model": "a", "prompt": "hi",
                                                       "max_tokens": 2, "temperature": 2})
  assert status == 200 and answer["usage"]["completion_tokens"] <= 2, answer
