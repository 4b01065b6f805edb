"""``lora-jax serve``: an OpenAI-style HTTP server over one model and its LoRA adapters.

Every adapter is loaded once into an ``AdapterBank`` over the model's parameters; requests are
decoded together in mixed batches (``jobs``: the queue and its worker; ``service``: the
endpoints, their checks and errors, and the HTTP handling). SIGTERM or SIGINT stops the server
cleanly: no new connections, the batch being decoded finishes, queued requests are answered
503, and ``serve`` returns 0.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading

from lora_jax import generate as generate_lib
from lora_jax.app.causal.generation import generate_mixed, load_bank
from lora_jax.app.causal.model import load_model
from lora_jax.app.options import bound_text
from lora_jax.app.serve.jobs import Batcher, HTTPError, Job, groups, padded_size
from lora_jax.app.serve.service import DEFAULT_MAX_TOKENS, Server, Service

__all__ = ["DEFAULT_MAX_TOKENS", "Batcher", "HTTPError", "Job", "Service", "groups",
           "padded_size", "serve"]

# serve()'s settings: (least, most) of each
SETTINGS = {"port": (0, 65535), "max_batch": (1, 1024), "max_queue": (1, 2**20),
            "max_new_tokens_limit": (1, 2**31 - 1), "batch_wait_ms": (0, 60_000)}


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
  _check_settings(max_batch=max_batch, max_queue=max_queue,
                  max_new_tokens_limit=max_new_tokens_limit, batch_wait_ms=batch_wait_ms,
                  port=port)
  if model_name in adapters:
    raise ValueError(f"--adapter: the name {model_name!r} is the model's; a request names the "
                     f"base model by it, so give the adapter another name.")
  server = _listen(host, port)  # first: a port in use fails before the model loads
  try:
    model = load_model(model_name, quantize=quantize)
    bank = load_bank(model, adapters)
    decode = functools.partial(generate_mixed, model, bank)
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
