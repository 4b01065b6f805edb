"""Small test helpers (no chex dependency), and the lora-jax command line and server run as
processes."""

import contextlib
import dataclasses
import io
import json
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax


def assert_trees_close(actual, desired, *, rtol=1e-5, atol=1e-6):
  """Leaf-by-leaf ``np.testing.assert_allclose`` on two trees of the same structure."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(desired)
  for a, d in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(d, np.float64),
                               rtol=rtol, atol=atol)


def randomize_b(adapters, key, scale=0.5):
  """Adapters with random (nonzero) B, so the adapter changes the output."""
  flat = jax.tree_util.tree_leaves(adapters, is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))
  keys = iter(jax.random.split(key, len(flat)))

  def fill(lw):
    if not isinstance(lw, lora_jax.LoraWeights):  # a trained extra stays as it is
      return lw
    b = scale * jax.random.normal(next(keys), lw.b.shape, lw.b.dtype)
    return dataclasses.replace(lw, b=b)

  return jax.tree_util.tree_map(fill, adapters,
                                is_leaf=lambda x: isinstance(x, lora_jax.LoraWeights))


def f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def flat_adapters(trainable):
  """``{'/'-joined path: LoraWeights}`` of a trainable tree (extras left out)."""
  lora, _ = lora_jax.adapters.split(trainable)
  return {"/".join(p): lw for p, lw in lora.items()}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """``lora-jax ARGV`` run in this process (no interpreter start-up): exit code, stdout, stderr
  (argparse's errors exit through ``SystemExit``)."""
  from lora_jax.app import cli
  try:
    code = cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def cli_here(*argv):
  """``lora-jax ARGV`` run in this process, shaped like ``cli``'s ``CompletedProcess``
  (``returncode``, ``stdout``, ``stderr``) and usable where ``capsys`` is not (a module's
  fixture): a run that needs no process of its own skips the interpreter start-up and shares
  this process's compiled programs with the tests that use it."""
  from lora_jax.app import cli as app  # the app only where a test runs it
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = app.main([str(a) for a in argv])
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess(["lora-jax", *argv], code, out.getvalue(), err.getvalue())


# ---- lora-jax processes: the command line and the server

READY_S = 240  # loading, and compiling the warm-up decode, on a slow CPU
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy

def cli_process(*argv) -> list[str]:
  return [sys.executable, "-m", "lora_jax.app.cli", *argv]


@contextlib.contextmanager
def serving(argv, err: pathlib.Path, *, ready: str = "serving on http://127.0.0.1:"):
  """A ``lora-jax serve ARGV`` process, once it printed its ready line (stderr to ``err``):
  yields ``(url, process)``; stopped with SIGTERM (then killed) at the end."""
  with open(err, "w") as stderr:
    proc = subprocess.Popen(cli_process("serve", *argv), stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
  try:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
      line = lines.get(timeout=READY_S)
    except queue.Empty:
      pytest.fail(f"no ready line in {READY_S} s; stderr: {err.read_text()[-2000:]}")
    assert line.startswith(ready), (line, err.read_text()[-2000:])
    yield line.split()[-1], proc
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def request(url: str, path: str, body=None, *, method=None, data: bytes | None = None):
  """``(status, JSON answer)`` of one HTTP request (a dict ``body`` is sent as JSON)."""
  if body is not None:
    data = json.dumps(body).encode()
  req = urllib.request.Request(url + path, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  try:
    with HTTP.open(req, timeout=300) as answer:
      return answer.status, json.loads(answer.read())
  except urllib.error.HTTPError as e:
    with e:
      return e.code, json.loads(e.read())


def cli(*argv, timeout=600):
  return subprocess.run(cli_process(*argv), capture_output=True,
                        text=True, timeout=timeout)
