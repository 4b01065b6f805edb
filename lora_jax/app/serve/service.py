"""``lora-jax serve``'s endpoints and their HTTP handling.

* ``POST /v1/completions`` ``{model, prompt, max_tokens, temperature, top_p, top_k, seed}``:
  the prompt string is used as is (no chat template);
* ``POST /v1/chat/completions`` ``{model, messages, ...}``: the messages rendered with the
  model's chat template;
* ``GET /v1/models`` (the base and the adapters) and ``GET /health``.

A request's ``model`` names an adapter, or the base model (its ``--model`` name) for none.
Errors are JSON ``{"error": {"message", "type", "code"}}`` with status 400 (a malformed
request), 404 (an unknown model or path), 405, 413, 503 (queue full, shutting down) or 500 (a
failure while decoding: that batch's requests only; the server keeps running).
"""

from __future__ import annotations

import http.server
import json
import sys
import time
import uuid

from lora_jax import generate as generate_lib
from lora_jax.app.data import lone_surrogate
from lora_jax.app.options import MAX_INT, MAX_TEMPERATURE
from lora_jax.app.serve.jobs import Batcher, HTTPError, Job

DEFAULT_MAX_TOKENS = 16  # a request's max_tokens when it gives none (OpenAI's default)
MAX_BODY = 16 * 2**20  # bytes: a larger request body is refused (413)


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list"}


def _field(body: dict, name: str, kinds: tuple, default=None, *, required: bool = False):
  """``body[name]``, checked to be one of ``kinds`` (true/false is not a number), or
  ``default`` when it is missing or null; 400 when it is required and missing, or of
  another type."""
  if body.get(name) is None:
    if required:
      raise HTTPError(400, f"missing required field {name!r}.", "missing_field")
    return default
  value = body[name]
  if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
    kind = "number" if float in kinds else " or ".join(JSON_TYPES[k] for k in kinds)
    raise HTTPError(400, f"{name!r} must be a {kind}, got {json.dumps(value)[:80]}.",
                    "invalid_type")
  return value


def _text(value, name: str) -> None:
  """400 when the string(s) in ``value`` hold a lone surrogate (a JSON ``"\\ud800"`` escape
  without its pair), which is not text and which no tokenizer takes."""
  found = lone_surrogate(value, name)
  if found is not None:
    raise HTTPError(400, f"'{found[0]}' holds a lone surrogate ({found[1]}): half of a UTF-16 "
                         f"pair, which is not text; send the character itself or its whole "
                         f"pair.", "invalid_value")


class Service:
  """The model, its adapters and the batcher, and the answers to each endpoint."""

  def __init__(self, model, bank, base_name: str, batcher: Batcher, *,
               max_new_tokens_limit: int):
    self.model, self.bank, self.base_name, self.batcher = model, bank, base_name, batcher
    self.limit = max_new_tokens_limit
    self.created = int(time.time())

  @property
  def names(self) -> list[str]:
    """The models a request may name: the base, then the adapters."""
    return [self.base_name] + [n for n in self.bank.names if n is not None]

  def adapter(self, body: dict) -> str | None:
    """The adapter a request names (None: the base model); 404 for an unknown name."""
    name = _field(body, "model", (str,), required=True)
    if name == self.base_name:
      return None
    if name not in self.names:
      raise HTTPError(404, f"model {name!r} does not exist; available models: "
                           f"{', '.join(self.names)}.", "model_not_found")
    return name

  def job(self, body: dict, ids: list[int]) -> Job:
    """A job of prompt ``ids`` with the request's model and settings, checked."""
    adapter = self.adapter(body)
    if _field(body, "stream", (bool,), False):
      raise HTTPError(400, "'stream': true is not supported; ask for the whole answer.",
                      "unsupported")
    if _field(body, "n", (int,), 1) != 1:
      raise HTTPError(400, "'n' must be 1 (one answer per request).", "unsupported")
    max_tokens = _field(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= self.limit:
      raise HTTPError(400, f"'max_tokens' must be between 1 and {self.limit} "
                           f"(--max-new-tokens-limit), got {max_tokens}.", "invalid_value")
    if not ids:
      raise HTTPError(400, "the prompt is empty; give at least one token of text.",
                      "invalid_value")
    context = self.model.config.max_position_embeddings
    if len(ids) + max_tokens > context:
      raise HTTPError(400, f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} "
                           f"that is {len(ids) + max_tokens} tokens, over the model's context "
                           f"of {context} tokens.", "context_length_exceeded")
    temperature = _field(body, "temperature", (int, float), 0.0)
    if not temperature <= MAX_TEMPERATURE:  # nan, inf, too hot (a negative one: Sampling's)
      raise HTTPError(400, f"'temperature' must be a number from 0 to {MAX_TEMPERATURE:g}, "
                           f"got {str(temperature)[:40]}.", "invalid_value")
    top_k = _field(body, "top_k", (int,))
    if top_k is not None and not 1 <= top_k <= MAX_INT:
      raise HTTPError(400, f"'top_k' must be an integer from 1 to 2**31 - 1, got "
                           f"{str(top_k)[:40]}.", "invalid_value")
    try:
      sampling = generate_lib.Sampling(temperature=float(temperature), top_k=top_k,
                                       top_p=_field(body, "top_p", (int, float)))
    except ValueError as e:
      raise HTTPError(400, str(e), "invalid_value") from None
    seed = _field(body, "seed", (int,), 0)
    if not 0 <= seed < 2 ** 63:
      raise HTTPError(400, f"'seed' must be an integer from 0 to 2**63 - 1, got {seed}.",
                      "invalid_value")
    return Job(ids, adapter, max_tokens, sampling, seed)

  def run(self, job: Job) -> tuple[str, str, int]:
    """Queues ``job``, waits for it: ``(text, finish_reason, completion tokens)``."""
    self.batcher.submit(job)
    job.done.wait()
    if job.error is not None:
      raise job.error
    tokens = job.tokens
    stopped = bool(tokens) and tokens[-1] in self.batcher.stop_ids
    text = self.model.tokenizer.decode(tokens[:-1] if stopped else tokens)
    return text, "stop" if stopped else "length", len(tokens)

  def completion(self, body: dict) -> dict:
    """``POST /v1/completions``: the prompt string as is."""
    prompt = _field(body, "prompt", (str,), required=True)
    _text(prompt, "prompt")
    job = self.job(body, self.model.tokenizer.encode(prompt))
    text, finish, used = self.run(job)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(len(job.ids), used)}

  def chat(self, body: dict) -> dict:
    """``POST /v1/chat/completions``: the messages rendered with the chat template."""
    messages = _field(body, "messages", (list,), required=True)
    self.adapter(body)  # an unknown model is 404 before a malformed message is 400
    _text(messages, "messages")
    try:
      prompt = self.model.tokenizer.render(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001  ValueError, or the template's own error
      raise HTTPError(400, f"messages: {e}", "invalid_value") from None
    job = self.job(body, self.model.tokenizer.encode(prompt))
    text, finish, used = self.run(job)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": _usage(len(job.ids), used)}

  def models(self) -> dict:
    """``GET /v1/models``: the base model, then the adapters (their ``parent`` the base)."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": self.created, "owned_by": "lora-jax",
         "parent": None if name == self.base_name else self.base_name}
        for name in self.names]}

  def health(self) -> dict:
    """``GET /health``: the models, the queue and what the worker has decoded."""
    return {"status": "ok", "model": self.base_name, "adapters": self.names[1:],
            "queued": self.batcher.queue.qsize(), **self.batcher.stats}


def _usage(prompt: int, completion: int) -> dict:
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


# ----------------------------------------------------------------------- HTTP


ROUTES = {"/v1/completions": ("POST", "completion"),
          "/v1/chat/completions": ("POST", "chat"),
          "/v1/models": ("GET", "models"),
          "/health": ("GET", "health")}


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes a request to the server's ``Service`` and writes its JSON answer (HTTP/1.0: one
  request per connection)."""

  server_version = "lora-jax"
  timeout = 60  # seconds a connection may stay silent

  def do_GET(self):  # noqa: N802  (http.server's names)
    self._answer("GET")

  def do_POST(self):  # noqa: N802
    self._answer("POST")

  def do_PUT(self):  # noqa: N802
    self._answer("PUT")

  def do_DELETE(self):  # noqa: N802
    self._answer("DELETE")

  def do_PATCH(self):  # noqa: N802
    self._answer("PATCH")

  def _answer(self, method: str) -> None:
    """The route's answer, or its error, sent once (a client gone by then: ``handle_error``)."""
    status, allow = 200, ""
    try:
      payload = self._route(method)
    except HTTPError as e:
      status, payload, allow = e.status, e.body(), ROUTES.get(self._path(), ("",))[0]
    except Exception as e:  # noqa: BLE001  a bug answers 500, never kills the server
      status, payload = 500, HTTPError(500, f"{type(e).__name__}: {e}", "internal_error").body()
    self._send(status, payload, allow=allow)

  def _path(self) -> str:
    return self.path.split("?", 1)[0].rstrip("/") or "/"

  def _route(self, method: str) -> dict:
    if self._path() not in ROUTES:
      raise HTTPError(404, f"no such path {self._path()!r}; the paths are: "
                           f"{', '.join(ROUTES)}.", "not_found")
    allowed, name = ROUTES[self._path()]
    if method != allowed:
      raise HTTPError(405, f"{method} is not allowed on {self._path()}; use {allowed}.",
                      "method_not_allowed")
    answer = getattr(self.server.service, name)
    return answer(self._body()) if method == "POST" else answer()

  def _body(self) -> dict:
    """The request's JSON object; 400 when it is not one, 413 when it is too large."""
    try:
      length = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      length = -1
    if length < 0:
      raise HTTPError(400, "the Content-Length header is not a byte count.", "invalid_request")
    if length > MAX_BODY:
      raise HTTPError(413, f"the request body has {length} bytes, over {MAX_BODY}.",
                      "too_large")
    raw = self.rfile.read(length)
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HTTPError(400, f"the body is not valid JSON: {e}.", "invalid_json") from None
    except ValueError:  # Python's limit on the digits of an integer
      raise HTTPError(400, "the body holds an integer of over 4300 digits; no field takes "
                           "one.", "invalid_json") from None
    if not isinstance(body, dict):
      raise HTTPError(400, "the body must be a JSON object.", "invalid_json")
    return body

  def _send(self, status: int, payload: dict, *, allow: str = "") -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    if status == 405 and allow:
      self.send_header("Allow", allow)
    self.end_headers()
    self.wfile.write(data)


class Server(http.server.ThreadingHTTPServer):
  """A thread per connection; ``server_close`` waits for them (each has a reply coming)."""

  daemon_threads = False
  block_on_close = True
  request_queue_size = 128  # the listen backlog: bursts wait while the worker holds the GIL

  service: Service | None = None  # set once the model is loaded

  def __init__(self, address):
    super().__init__(address, Handler)

  def handle_error(self, request, client_address) -> None:
    """One line on stderr (a client that went away), not socketserver's traceback."""
    error = sys.exc_info()[1]
    print(f"lora-jax serve: {client_address[0]}: {type(error).__name__}: {error}",
          file=sys.stderr, flush=True)

