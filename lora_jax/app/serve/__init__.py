"""``lora-jax serve``: an OpenAI-style HTTP server over one model and its LoRA adapters.

Every adapter is loaded once into an ``AdapterBank`` over the model's parameters; a request's
``model`` names an adapter, or the base model (its ``--model`` name) for none. Endpoints:

* ``POST /v1/completions`` ``{model, prompt, max_tokens, temperature, top_p, top_k, seed}``:
  the prompt string is used as is (no chat template);
* ``POST /v1/chat/completions`` ``{model, messages, ...}``: the messages rendered with the
  model's chat template;
* ``GET /v1/models`` (the base and the adapters) and ``GET /health``.

Batching: the HTTP handler threads put their requests into a bounded queue (full: 503). One
worker thread, the only one that runs JAX, takes the first request, waits up to
``--batch-wait-ms`` for more (up to ``--max-batch``), groups those with the same sampling
settings and decodes each group in one mixed batch: each row with its own adapter (or none),
``max_new_tokens`` the group's largest ``max_tokens`` rounded up to a power of two (at least
16, within the context), each answer cut to its own. Greedy
answers (the default, temperature 0) do not depend on the batch they are decoded in. Batches
are padded to a power of two rows (copies of the first row), so a few compiled shapes serve
every batch size.

Errors are JSON ``{"error": {"message", "type", "code"}}`` with status 400 (a malformed
request), 404 (an unknown model or path), 405, 413, 503 (queue full, shutting down) or 500 (a
failure while decoding: that batch's requests only; the server keeps running). SIGTERM or
SIGINT stops the server cleanly: no new connections, the batch being decoded finishes, queued
requests are answered 503, and ``serve`` returns 0.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import math
import queue
import signal
import sys
import threading
import time
import uuid

__all__ = ["DEFAULT_MAX_TOKENS", "Batcher", "HTTPError", "Job", "Service",
           "serve"]

DEFAULT_MAX_TOKENS = 16  # a request's max_tokens when it gives none (OpenAI's default)
MAX_BODY = 16 * 2**20  # bytes: a larger request body is refused (413)
POLL_S = 0.1  # how often an idle worker looks whether the server is stopping
# serve()'s settings: (least, most) of each
SETTINGS = {"port": (0, 65535), "max_batch": (1, 1024), "max_queue": (1, 2**20),
            "max_new_tokens_limit": (1, 2**31 - 1), "batch_wait_ms": (0, 60_000)}


class HTTPError(Exception):
  """An error answer: HTTP ``status``, a ``message`` for the client and a short ``code``."""

  def __init__(self, status: int, message: str, code: str):
    super().__init__(message)
    self.status, self.message, self.code = status, message, code

  def body(self) -> dict:
    kind = "server_error" if self.status >= 500 else "invalid_request_error"
    return {"error": {"message": self.message, "type": kind, "code": self.code}}


# ----------------------------------------------------------------------- decoding


def _fail(jobs, error: Exception) -> None:
  """Answers every job with a 500 naming ``error``."""
  failure = HTTPError(500, f"decoding failed: {type(error).__name__}: {error}",
                      "internal_error")
  for job in jobs:
    job.finish(error=failure)


@dataclasses.dataclass(eq=False)
class Job:
  """One request to decode, and (once ``done`` is set) its new tokens or its error."""

  ids: list[int]
  adapter: str | None  # None: the base model
  max_tokens: int
  sampling: object  # lora_jax.generate.Sampling
  seed: int = 0
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  tokens: list[int] | None = None
  error: HTTPError | None = None

  def finish(self, tokens=None, error: HTTPError | None = None) -> None:
    self.tokens, self.error = tokens, error
    self.done.set()

  def group_key(self):
    """Jobs with equal keys can share a batch (greedy decoding ignores the seed)."""
    return (self.sampling, 0 if self.sampling.greedy else self.seed)


def padded_size(rows: int, max_batch: int) -> int:
  """The batch size ``rows`` is padded to: the next power of two, at most ``max_batch``."""
  return max(rows, min(1 << (rows - 1).bit_length(), max_batch))


def groups(jobs: list[Job], context: int) -> list[list[Job]]:
  """``jobs`` split into batches of equal sampling settings whose longest prompt plus largest
  ``max_tokens`` fit the model's ``context`` (each job fits alone: checked on arrival)."""
  out: list[list[Job]] = []
  open_groups: dict = {}
  for job in jobs:
    group = open_groups.get(job.group_key())
    if group is not None and (max(len(j.ids) for j in group + [job])
                              + max(j.max_tokens for j in group + [job]) > context):
      group = None
    if group is None:
      group = open_groups[job.group_key()] = []
      out.append(group)
    group.append(job)
  return out


class Batcher:
  """The request queue and the one worker thread that decodes it in mixed batches."""

  def __init__(self, decode, *, stop_ids, context: int, max_batch: int, max_queue: int,
               wait_s: float):
    self.decode, self.stop_ids, self.context = decode, set(stop_ids), context
    self.max_batch, self.wait_s = max_batch, wait_s
    self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
    self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
    self._lock = threading.Lock()
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="lora-jax-serve-worker", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def submit(self, job: Job) -> None:
    """Queues ``job``; raises HTTPError 503 when the queue is full or the server stops."""
    with self._lock:
      if self._closed:
        raise HTTPError(503, "the server is shutting down.", "shutting_down")
      try:
        self.queue.put_nowait(job)
      except queue.Full:
        raise HTTPError(503, f"the server is busy: {self.queue.maxsize} requests are waiting "
                             f"(--max-queue); retry later.", "queue_full") from None

  def stop(self, timeout: float | None = None) -> None:
    """Lets the batch being decoded finish, answers the queued requests 503 and ends the
    worker."""
    with self._lock:
      self._closed = True
    if self._thread.is_alive():
      self._thread.join(timeout)
    self._fail_queued()

  def _run(self) -> None:
    while True:
      jobs = self._collect()
      if not jobs:
        break
      try:
        batches = groups(jobs, self.context)
      except Exception as e:  # noqa: BLE001  never leave a request waiting on a dead worker
        _fail(jobs, e)
        continue
      for group in batches:
        self._decode(group)
    self._fail_queued()

  def _collect(self) -> list[Job]:
    """The next batch: blocks for a first job, then takes more for up to ``wait_s`` (and
    those already waiting), up to ``max_batch``; empty once the server stops."""
    first = None
    while first is None:
      if self._closed:
        return []
      try:
        first = self.queue.get(timeout=POLL_S)
      except queue.Empty:
        pass
    jobs, deadline = [first], time.monotonic() + self.wait_s
    while len(jobs) < self.max_batch:
      left = deadline - time.monotonic()
      try:
        jobs.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
      except queue.Empty:
        break
    return jobs

  def _decode(self, group: list[Job]) -> None:
    """Decodes ``group`` in one mixed batch and answers each job; a failure answers 500."""
    rows = padded_size(len(group), self.max_batch)
    ids = [j.ids for j in group] + [group[0].ids] * (rows - len(group))
    names = [j.adapter for j in group] + [group[0].adapter] * (rows - len(group))
    sampling = group[0].sampling
    try:
      result = self.decode(ids, names, max_new_tokens=self._budget(group), sampling=sampling,
                           seed=0 if sampling.greedy else group[0].seed)
    except Exception as e:  # noqa: BLE001  the server keeps running; this batch fails
      _fail(group, e)
      return
    self.stats["requests"] += len(group)
    self.stats["batches"] += 1
    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
    for job, tokens in zip(group, result.tokens):
      job.finish(tokens=tokens[:job.max_tokens])

  def _budget(self, group: list[Job]) -> int:
    """New tokens to decode: the group's largest ``max_tokens`` rounded up to a power of two
    (at least 16), so few lengths compile; within the context; each answer is cut to its
    own ``max_tokens`` (greedy tokens do not depend on how many follow)."""
    wanted = max(j.max_tokens for j in group)
    bucket = max(16, 1 << (wanted - 1).bit_length())
    return max(wanted, min(bucket, self.context - max(len(j.ids) for j in group)))

  def _fail_queued(self) -> None:
    error = HTTPError(503, "the server is shutting down.", "shutting_down")
    while True:
      try:
        self.queue.get_nowait().finish(error=error)
      except queue.Empty:
        return


# ----------------------------------------------------------------------- requests


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
  from lora_jax.app.data import lone_surrogate

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
    from lora_jax import generate as generate_lib
    from lora_jax.app.options import MAX_INT, MAX_TEMPERATURE

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


# ----------------------------------------------------------------------- the command


def serve(model_name: str, adapters: dict[str, str], *, host: str = "127.0.0.1",
          port: int = 8000, max_batch: int = 16, max_queue: int = 64,
          max_new_tokens_limit: int = 512, batch_wait_ms: float = 5.0,
          quantize: str = "none", out=None) -> int:
  """Serves ``adapters`` (``{name: path}``) over the model ``model_name`` until SIGTERM or
  SIGINT; returns 0. Prints ``serving on http://HOST:PORT`` to ``out`` (stdout) once ready
  (model and adapters loaded, one warm-up decode done); port 0 picks a free port.

  Raises:
    ValueError: a bad setting, a model or adapter that does not load, an adapter named like
      the model, or an address that cannot be listened on.
  """
  from lora_jax.app import causal

  _check_settings(max_batch=max_batch, max_queue=max_queue,
                  max_new_tokens_limit=max_new_tokens_limit, batch_wait_ms=batch_wait_ms,
                  port=port)
  if model_name in adapters:
    raise ValueError(f"--adapter: the name {model_name!r} is the model's; a request names the "
                     f"base model by it, so give the adapter another name.")
  server = _listen(host, port)  # first: a port in use fails before the model loads
  try:
    model = causal.load_model(model_name, quantize=quantize)
    bank = causal.load_bank(model, adapters)
    decode = functools.partial(causal.generate_mixed, model, bank)
    batcher = Batcher(decode, stop_ids=model.tokenizer.stop_ids,
                      context=model.config.max_position_embeddings, max_batch=max_batch,
                      max_queue=max_queue, wait_s=batch_wait_ms / 1000)
    server.service = Service(model, bank, model_name, batcher,
                             max_new_tokens_limit=max_new_tokens_limit)
    _warm_up(model, decode, min(DEFAULT_MAX_TOKENS, max_new_tokens_limit))
  except BaseException:
    server.server_close()
    raise
  return _run(server, batcher, host, out or sys.stdout)


def _check_settings(**values) -> None:
  """Raises ValueError naming the first setting outside its ``SETTINGS`` range."""
  from lora_jax.app.options import bound_text

  for name, value in values.items():
    least, most = SETTINGS[name]
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{flag} must be a finite number, got {value}.")
    if value < least:
      raise ValueError(f"{flag} must be >= {least}, got {value}.")
    if value > most:
      raise ValueError(f"{flag} must be <= {bound_text(most)}, got {value}.")


def _listen(host: str, port: int) -> Server:
  try:
    return Server((host, port))
  except OSError as e:
    raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}.") from None


def _warm_up(model, decode, max_new_tokens: int) -> None:
  """One decode of a short chat prompt, so the first request of that shape is not slow."""
  from lora_jax import generate as generate_lib

  tok = model.tokenizer
  ids = tok.encode(tok.render([{"role": "user", "content": "Hello"}],
                              add_generation_prompt=True))
  decode([ids], [None], max_new_tokens=max_new_tokens, sampling=generate_lib.GREEDY, seed=0)


def _on_signals(handler) -> dict:
  """SIGTERM and SIGINT call ``handler`` (in the main thread only); the previous handlers."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _run(server: Server, batcher: Batcher, host: str, out) -> int:
  """Serves until SIGTERM or SIGINT, then shuts down in order: no new connections, the worker
  stopped (the batch in progress answered, queued requests 503), the connections' threads
  joined."""
  stop = threading.Event()
  previous = _on_signals(lambda *_: stop.set())
  batcher.start()
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                            name="lora-jax-serve-http", daemon=True)
  thread.start()
  try:
    print(f"serving on http://{host}:{server.server_address[1]}", file=out, flush=True)
    while not stop.wait(0.5):
      pass
  finally:
    server.shutdown()
    batcher.stop()
    server.server_close()
    thread.join()
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  stats = batcher.stats
  print(f"lora-jax serve: stopped after {stats['requests']} requests in {stats['batches']} "
        f"batches", file=sys.stderr, flush=True)
  return 0
