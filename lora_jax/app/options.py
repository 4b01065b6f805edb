"""Run options: dataclasses that serialize with ``lora_jax.config.Serializable`` (the same
``to_dict`` / ``from_dict`` as ``LoraConfig``) and generate the command line's flags.

Every field is one ``--flag`` (``batch_size`` -> ``--batch-size``) whose help is the field's
``metadata["help"]``; a bool field is a switch. Checks raise ``OptionError`` naming the field;
the command line translates the field into its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re

from lora_jax import kinds
from lora_jax.config import BIASES, Serializable


INITS = ("kaiming", "gaussian", "pissa", "olora")
MAX_INT = 2**31 - 1  # the largest count or training seed (int32: shapes, steps, PRNG keys)
MAX_SEED = 2**63 - 1  # the largest sampling seed of generate and serve (an int64)
MAX_EPOCHS = 1_000_000
MAX_TEMPERATURE = 2.0  # OpenAI's API accepts temperatures from 0 to 2


class OptionError(ValueError):
  """A bad option value; ``field`` is the option's field name (the CLI shows it as a flag)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field} {message}")
    self.field, self.message = field, message


def option(default, help: str, **metadata):  # noqa: A002  (argparse's word)
  """A dataclass field with its command-line help (and optional ``choices``)."""
  return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _positive(name: str, value, *, integer: bool = False, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  kind = numbers.Integral if integer else numbers.Real
  if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
    raise OptionError(name, f"must be {'an integer' if integer else 'a number'} > 0, got "
                            f"{value!r}.")
  if integer:
    at_most(name, value)
  elif not math.isfinite(value):
    raise OptionError(name, f"must be a finite number, got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions(Serializable):
  """What every task's run needs: the adapter, the optimizer, the step budget, the devices."""

  rank: int = option(8, "LoRA rank r")
  alpha: float = option(16.0, "LoRA alpha (the scale is alpha / rank)")
  targets: str = option("q,v", "q,v (default), all-linear, family aliases or path patterns")
  lora_dropout: float = option(0.0, "dropout on the LoRA branch's input (PEFT's lora_dropout)")
  variant: str = option("lora", "the adapter kind (lora_jax.kinds): " + "; or ".join(
      kinds.named(n).summary for n in kinds.names()), choices=kinds.names())
  init: str = option("kaiming", "A's (and B's) initialisation: kaiming (PEFT's default; B = 0), "
                                "gaussian, or pissa / olora (A and B from W's top singular "
                                "triplets / its QR decomposition, the base keeping the residual); "
                                "pissa_niter_N: PiSSA from a randomized SVD, N iterations")
  bias: str = option("none", "biases trained in place, as PEFT's bias: none, lora_only (those "
                             "of the adapted layers) or all (every bias, LayerNorms' too)",
                     choices=BIASES)
  full: bool = option(False, "full fine-tuning (the baseline) instead of LoRA")
  lr: float | None = option(None, "peak learning rate (default: 1e-3 with LoRA, 5e-5 full)")
  lora_plus_ratio: float | None = option(
      None, "LoRA+: B's learning rate (and the head's bias's, as PEFT groups them) is this "
            "times --lr (A's and the head's weight's)")
  batch_size: int = option(32, "examples per step")
  epochs: float = option(3.0, "passes over the training data (--steps overrides)")
  steps: int | None = option(None, "training steps (overrides --epochs)")
  eval_every: int = option(100, "evaluate and checkpoint every N steps")
  eval_examples: int = option(0, "validation examples scored at each evaluation (0: all)")
  log_every: int = option(10, "log the mean training loss over every N steps")
  seed: int = option(0, "data order, head and A initialisation")
  remat: bool = option(False, "gradient checkpointing: recompute each layer in the backward pass")
  skip_nonfinite: bool = option(False, "skip a step whose loss or gradients are not finite "
                                       "(optax.apply_if_finite) instead of stopping the run; "
                                       "it still stops after 5 such steps in a row")
  mesh: str | None = option(None, 'device mesh "DxM": the batch over D devices, the model '
                                  'tensor-parallel over M (D*M = all devices), e.g. 8x1 or 4x2')

  def __post_init__(self):
    if self.variant not in kinds.names():
      raise OptionError("variant", f"must be one of {', '.join(kinds.names())} (the registered "
                                   f"adapter kinds), got {self.variant!r}.")
    if self.full and self.variant != "lora":
      raise OptionError("variant", f"{self.variant} adapts W, which --full trains whole; drop "
                                   f"one of them.")
    if not (isinstance(self.init, str) and (self.init in INITS
                                             or re.fullmatch(r"pissa_niter_[1-9]\d*", self.init))):
      raise OptionError("init", f"must be one of {', '.join(INITS)} or pissa_niter_N (N >= 1), "
                                f"got {self.init!r}.")
    if self.full and self.init != "kaiming":
      raise OptionError("init", f"{self.init} initialises adapters, which --full does not "
                                f"train; drop one of them.")
    if self.bias not in BIASES:
      raise OptionError("bias", f"must be one of {', '.join(BIASES)}, got {self.bias!r}.")
    if self.full and self.bias != "none":
      raise OptionError("bias", f"{self.bias} trains biases beside LoRA; --full trains every "
                                f"parameter already: drop one of them.")
    _positive("rank", self.rank, integer=True)
    _positive("alpha", self.alpha)
    for name in ("batch_size", "eval_every", "log_every"):
      _positive(name, getattr(self, name), integer=True)
    _positive("steps", self.steps, integer=True, allow_none=True)
    if not (isinstance(self.eval_examples, int) and not isinstance(self.eval_examples, bool)
            and self.eval_examples >= 0):
      raise OptionError("eval_examples", f"must be an integer >= 0, got "
                                         f"{self.eval_examples!r}.")
    at_most("eval_examples", self.eval_examples)
    if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
            and 0 <= self.seed <= MAX_INT):
      raise OptionError("seed", f"must be an integer from 0 to {bound_text(MAX_INT)}, got "
                                f"{self.seed!r}.")
    _positive("epochs", self.epochs)
    if self.epochs > MAX_EPOCHS:
      raise OptionError("epochs", f"must be a number <= {MAX_EPOCHS}, got {self.epochs!r}.")
    _positive("lr", self.lr, allow_none=True)
    if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
      raise OptionError("lora_dropout", f"must be a number in [0, 1), got "
                                        f"{self.lora_dropout!r}.")
    if self.lora_plus_ratio is not None:
      if self.full:
        raise OptionError("lora_plus_ratio", f"applies to a LoRA run, not with full, got "
                                             f"{self.lora_plus_ratio!r} with full.")
      _positive("lora_plus_ratio", self.lora_plus_ratio)

  @property
  def lora_init(self) -> str:
    """``LoraConfig.init`` for ``init``."""
    return "kaiming_uniform" if self.init == "kaiming" else self.init

  @property
  def learning_rate(self) -> float:
    return self.lr if self.lr is not None else (5e-5 if self.full else 1e-3)


def flag(field: str) -> str:
  """The command-line flag of an option field."""
  return "--" + field.replace("_", "-")


def resumed(saved: RunOptions, given: dict, *, total_steps: int) -> RunOptions:
  """The options a resumed run continues with: the saved ones, with ``steps`` raised if asked
  (extending a run; its cosine schedule is re-planned over the new total).

  Raises:
    OptionError: a given option differs from the saved run's (named), or ``steps`` would
      shrink the run below ``total_steps``.
  """
  wanted = type(saved).from_dict({**saved.to_dict(), **given})
  changed = [f.name for f in dataclasses.fields(saved)
             if getattr(wanted, f.name) != getattr(saved, f.name)]
  for name in changed:
    if name != "steps":
      raise OptionError(name, f"{getattr(wanted, name)!r} differs from the saved run's "
                              f"{getattr(saved, name)!r}; --resume continues a run with the "
                              f"options it started with (only --steps may grow).")
  if "steps" in changed and wanted.steps < total_steps:
    raise OptionError("steps", f"{wanted.steps} is fewer than the saved run's {total_steps} "
                               f"steps; --resume can only extend a run.")
  return wanted


def bound_text(n: int) -> str:
  """``n`` as messages show it: ``2**31 - 1`` and ``2**20`` for those powers of two."""
  for k in range(20, 64):
    if n == 2**k:
      return f"2**{k}"
    if n == 2**k - 1 and k >= 31:
      return f"2**{k} - 1"
  return str(n)


def _cut(text: str) -> str:
  return text if len(text) <= 40 else text[:37] + "..."


def at_most(name: str, value, most: int = MAX_INT) -> None:
  """Raises ``OptionError`` naming ``name`` when the integer ``value`` is over ``most``.

  Args:
    name: the option's field name.
    value: its value (anything but an integer passes: other checks refuse it).
    most: the largest value accepted.
  """
  if isinstance(value, numbers.Integral) and value > most:
    raise OptionError(name, f"must be an integer <= {bound_text(most)}, got {value!r}.")


def integer_in(lo: int, hi: int):
  """An argparse ``type``: an integer from ``lo`` to ``hi`` (both included).

  Args:
    lo: the least value accepted.
    hi: the largest value accepted.

  Returns:
    A function of the flag's text that returns the integer or raises
    ``argparse.ArgumentTypeError`` (argparse prints it after the flag's name).

  Example:
    >>> integer_in(0, 65535)("8000")
    8000
  """

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {_cut(text)!r}") from None
    if not lo <= value <= hi:
      raise argparse.ArgumentTypeError(f"must be an integer from {bound_text(lo)} to "
                                       f"{bound_text(hi)}, got {_cut(text)}")
    return value

  return parse


def finite_in(lo: float, hi: float, *, low_open: bool = False):
  """An argparse ``type``: a finite number from ``lo`` to ``hi`` (``low_open``: above ``lo``).

  Args:
    lo: the least value accepted (with ``low_open``, the bound values must be above).
    hi: the largest value accepted.
    low_open: whether ``lo`` itself is refused.

  Returns:
    A function of the flag's text that returns the float or raises
    ``argparse.ArgumentTypeError``; ``inf``, ``1e999`` and ``nan`` are refused.

  Example:
    >>> finite_in(0, 1, low_open=True)("0.9")
    0.9
  """

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {_cut(text)!r}") from None
    if not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"must be a finite number, got {_cut(text)!r}")
    if not (lo < value if low_open else lo <= value) or value > hi:
      span = f"in ({lo:g}, {hi:g}]" if low_open else f"from {lo:g} to {hi:g}"
      raise argparse.ArgumentTypeError(f"must be a number {span}, got {_cut(text)}")
    return value

  return parse


def prompt_text(text: str) -> str:
  """An argparse ``type``: text without lone surrogates (Python's stand-ins for command-line
  bytes that are not UTF-8), which no tokenizer takes.

  Example:
    >>> prompt_text("café")
    'café'
  """
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    code = ord(text[e.start])
    what = (f"byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff
            else f"lone surrogate \\u{code:04x}")
    raise argparse.ArgumentTypeError(f"not UTF-8 text ({what} at character {e.start}); give "
                                     f"it in UTF-8") from None
  return text
