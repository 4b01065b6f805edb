"""``lora-jax serve``'s batching: the request queue and the one worker thread that decodes it.

The HTTP handler threads put their requests into a bounded queue (full: 503). The worker, the
only thread that runs JAX, takes the first request, waits up to ``--batch-wait-ms`` for more
(up to ``--max-batch``), groups those with the same sampling settings and decodes each group
in one mixed batch: each row with its own adapter (or none), ``max_new_tokens`` the group's
largest ``max_tokens`` rounded up to a power of two (at least 16, within the context), each
answer cut to its own. Greedy answers (the default, temperature 0) do not depend on the batch
they are decoded in. Batches are padded to a power of two rows (copies of the first row), so a
few compiled shapes serve every batch size.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

POLL_S = 0.1  # how often an idle worker looks whether the server is stopping


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

