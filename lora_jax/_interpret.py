"""A table-driven jaxpr evaluator: each equation a tracked value flows into runs its rule.

An equation whose inputs the context does not track (``ctx.tracks``) is re-bound unchanged
(``bind``). Any other runs ``ctx.rules[primitive name]``, a ``rule(eqn, invals, ctx)``, or
``fallback`` (the inputs as plain arrays, ``ctx.materialize``) where the table has none. A
rule that needs more of the jaxpr than its own equation is a ``FrameRule``: it also gets the
``Frame`` being evaluated, in which it may run later equations early (``Frame.evaluate``) or
give their outputs (``Frame.claim``); the loop then takes those outputs as they are. This
module names no primitive: the rules, higher-order ones included, are the context's
(``lora_jax._rules``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jax.extend import core


def bind(eqn, invals) -> list:
  """Re-binds ``eqn``'s primitive on ``invals``; always returns a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # JAX < 0.7 returned (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def open_jaxpr(jaxpr):
  """``(jaxpr, consts)`` of a jaxpr or a closed one."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


@dataclasses.dataclass(frozen=True)
class FrameRule:
  """A rule that also sees the jaxpr around its equation: ``fn(eqn, invals, ctx, frame)``."""

  fn: Callable


class Frame:
  """One jaxpr under evaluation, as a ``FrameRule`` sees it.

  Attributes:
    jaxpr: the open jaxpr.
    ctx: the context it runs in.
    index: the index of the equation being evaluated.
  """

  def __init__(self, jaxpr, ctx):
    self.jaxpr, self.ctx, self.index = jaxpr, ctx, -1
    self._env: dict = {}
    self._claimed: dict[int, list] = {}
    self._producer: dict | None = None
    self._users: dict | None = None

  def write(self, variables, values) -> None:
    """Binds ``variables`` to ``values`` (a dropped output is not kept)."""
    for v, x in zip(variables, values):
      if not isinstance(v, core.DropVar):
        self._env[v] = x

  def read(self, v):
    """``v``'s value: a literal's own, else the computed one (KeyError when not yet)."""
    return v.val if isinstance(v, core.Literal) else self._env[v]

  def value(self, v, default=None):
    """``v``'s value when it is known already, else ``default``."""
    return v.val if isinstance(v, core.Literal) else self._env.get(v, default)

  def producer(self, v) -> int | None:
    """The index of the equation that outputs ``v``; None for an input or a literal."""
    if self._producer is None:
      self._index()
    return None if isinstance(v, core.Literal) else self._producer.get(v)

  def users(self, v) -> tuple[int, ...]:
    """The indices of the equations that read ``v``, in order."""
    if self._users is None:
      self._index()
    return () if isinstance(v, core.Literal) else tuple(self._users.get(v, ()))

  def _index(self) -> None:
    self._producer, self._users = {}, {}
    for i, eqn in enumerate(self.jaxpr.eqns):
      for v in eqn.outvars:
        self._producer[v] = i
      for v in eqn.invars:
        if not isinstance(v, core.Literal) and i not in self._users.get(v, ()):
          self._users.setdefault(v, []).append(i)

  def done(self, i: int) -> bool:
    """Whether equation ``i`` has its outputs already (run early or claimed)."""
    return i in self._claimed or i <= self.index

  def claim(self, i: int, outvals) -> None:
    """Gives the outputs of the later equation ``i``: the loop takes them when it gets there.

    Raises:
      ValueError: if equation ``i`` is not a later one, or has outputs already.
    """
    if self.done(i):
      raise ValueError(f"claim: equation {i} is not a later, not yet claimed one of this "
                       f"jaxpr (now at {self.index}); claim each later equation once.")
    outvals = list(outvals)
    self._claimed[i] = outvals
    self.write(self.jaxpr.eqns[i].outvars, outvals)

  def evaluate(self, i: int) -> list:
    """Runs the later equation ``i`` now (its inputs must be known) and claims its outputs."""
    eqn = self.jaxpr.eqns[i]
    outvals = step(eqn, [self.read(v) for v in eqn.invars], self)
    self.claim(i, outvals)
    return outvals

  def take(self, i: int) -> list | None:
    """The outputs claimed for equation ``i``, or None."""
    return self._claimed.pop(i, None)


def step(eqn, invals, frame: Frame) -> list:
  """The outputs of ``eqn`` on ``invals``: its rule's when the context tracks an input."""
  ctx = frame.ctx
  if not any(ctx.tracks(x) for x in invals):
    return bind(eqn, invals)
  rule = ctx.rules.get(eqn.primitive.name, fallback)
  if isinstance(rule, FrameRule):
    return rule.fn(eqn, invals, ctx, frame)
  return rule(eqn, invals, ctx)


def eval_jaxpr(jaxpr, consts, args, ctx) -> list:
  """Evaluates ``jaxpr`` on ``args``, which may hold values the context tracks."""
  frame = Frame(jaxpr, ctx)
  frame.write(jaxpr.constvars, consts)
  frame.write(jaxpr.invars, args)
  for i, eqn in enumerate(jaxpr.eqns):
    frame.index = i
    outvals = frame.take(i)
    if outvals is None:
      outvals = step(eqn, [frame.read(v) for v in eqn.invars], frame)
    frame.write(eqn.outvars, outvals)
  return [frame.read(v) for v in jaxpr.outvars]


def run(closed, args, ctx) -> list:
  """Evaluates a closed jaxpr; tracked values that reach the outputs are materialized."""
  jaxpr, consts = open_jaxpr(closed)
  return [ctx.materialize(x, "output") for x in eval_jaxpr(jaxpr, consts, args, ctx)]


def fallback(eqn, invals, ctx) -> list:
  """``eqn`` on its inputs as plain arrays (``ctx.materialize``): the use with no rule."""
  return bind(eqn, [ctx.materialize(x, eqn.primitive.name) for x in invals])
