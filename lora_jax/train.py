"""optax glue: gradients for the trainable tree only, a jitted train step, and LoRA+.

The base tree is an argument of the step that is never differentiated: gradients, optimizer
state and updates exist for the trainable tree alone (A and B, plus any ``modules_to_save``
extras), and nothing full-size is built for a frozen leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from lora_jax.kinds import is_adapter
from lora_jax.config import is_real
from lora_jax.transform import lora


class StepOutput(NamedTuple):
  adapters: Any
  opt_state: optax.OptState
  loss: jax.Array
  aux: Any = None


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
               has_aux: bool = False, donate: bool = False, jit: bool = True,
               product: str = "auto", siblings: bool = True,
               recompute_inputs: bool = True) -> Callable:
  """A LoRA training step for ``loss_fn(params, batch)``, which sees ``params`` as if merged.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``), written
      against the ordinary parameter tree; ``lora_jax.lora`` adapts it.
    optimizer: an optax transformation; its state is ``optimizer.init(adapters)``, where
      ``adapters`` is the trainable tree of ``lora_jax.init`` (adapters and any trained
      ``modules_to_save`` extras).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the adapters and optimizer state buffers to the step (off by default:
      the caller's arrays stay valid).
    jit: compile the step with ``jax.jit``.
    product: how adapted products and their backward pass are computed (``lora_jax.lora``'s
      ``product``: ``"auto"``, ``"factored"``, ``"merged_weight"`` or ``"autodiff"``).
    siblings: compute products that share an activation together (``lora_jax.lora``'s).
    recompute_inputs: recompute the adapted products' cheap inputs in the backward pass
      instead of keeping them (``lora_jax.lora``'s).

  Returns:
    ``step(base, adapters, opt_state, batch, *, key=None) -> StepOutput(adapters, opt_state,
    loss, aux)``. ``key`` drives adapter dropout; without it no dropout is applied.

  Example:
    >>> step = lora_jax.train_step(loss_fn, optax.adamw(1e-3))
    >>> opt_state = optax.adamw(1e-3).init(adapters)
    >>> adapters, opt_state, loss, _ = step(params, adapters, opt_state, batch)
  """
  grad_fn = value_and_grad(loss_fn, has_aux=has_aux, product=product, siblings=siblings,
                           recompute_inputs=recompute_inputs)

  def step(base, adapters, opt_state, batch, *, key=None) -> StepOutput:
    value, grads = grad_fn(base, adapters, batch, lora_dropout_key=key)
    loss, aux = value if has_aux else (value, None)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return StepOutput(optax.apply_updates(adapters, updates), opt_state, loss, aux)

  if not jit:
    return step
  return jax.jit(step, donate_argnames=("adapters", "opt_state") if donate else ())


def value_and_grad(loss_fn: Callable, *, has_aux: bool = False, product: str = "auto",
                   siblings: bool = True, recompute_inputs: bool = True) -> Callable:
  """``jax.value_and_grad`` for LoRA: differentiates with respect to the trainable tree only.

  Returns ``f(base, adapters, *args, **kwargs) -> (value, grads)``, where value is
  ``loss_fn(merge(base, adapters), *args, **kwargs)`` (computed factored) and ``grads`` has the
  trainable tree's structure (A, B and any trained extras). The base is never differentiated.
  ``product``, ``siblings`` and ``recompute_inputs`` are ``lora_jax.lora``'s.
  """
  adapted = lora(loss_fn, product=product, siblings=siblings,
                 recompute_inputs=recompute_inputs)

  def f(base, adapters, *args, **kwargs):
    objective = lambda a: adapted(base, a, *args, **kwargs)  # noqa: E731
    return jax.value_and_grad(objective, has_aux=has_aux)(adapters)

  return f


def _factor_labels(trainable):
  """Each adapter's own LoRA+ groups (``groups()``: "b" for B, "a" for A), and for trained
  extras "b" when 1-D (a bias, a norm's scale), else "a": PEFT's
  ``create_loraplus_optimizer`` puts ``lora_B`` and 1-D parameters in its fast group B and
  everything else (A, a trained head's weight) in group A."""
  def label(x):
    if not is_adapter(x):
      return "b" if getattr(x, "ndim", len(getattr(x, "shape", ()))) == 1 else "a"
    return x.groups()

  return jax.tree_util.tree_map(label, trainable, is_leaf=is_adapter)


def lora_plus(make_optimizer: Callable[..., optax.GradientTransformation], *,
              learning_rate: float | optax.Schedule, ratio: float = 16.0,
              **optimizer_kwargs) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns ``ratio`` times faster than A.

  Built from ``optax.multi_transform``: A gets ``make_optimizer(learning_rate, ...)`` and B
  gets ``make_optimizer(ratio * learning_rate, ...)`` (a schedule is scaled step by step).
  Trained extras (``modules_to_save``) are grouped as PEFT's ``create_loraplus_optimizer``
  groups them: 1-D ones (biases, norm scales) with B, the others with A.

  Args:
    make_optimizer: an optax constructor taking the learning rate first, e.g. ``optax.adamw``.
    learning_rate: A's learning rate, a float or an optax schedule.
    ratio: lr_B / lr_A (the paper's lambda; 16 is its default recommendation).
    **optimizer_kwargs: passed to ``make_optimizer`` for both groups.

  Raises:
    ValueError: ``ratio`` is not positive.
  """
  if not (is_real(ratio) and ratio > 0):
    raise ValueError(f"ratio must be > 0 (lr_B / lr_A), got {ratio!r}.")
  if callable(learning_rate):
    lr_b = lambda count: ratio * learning_rate(count)  # noqa: E731
  else:
    lr_b = ratio * learning_rate
  return optax.multi_transform(
      {"a": make_optimizer(learning_rate, **optimizer_kwargs),
       "b": make_optimizer(lr_b, **optimizer_kwargs)},
      _factor_labels)
