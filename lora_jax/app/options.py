"""Run options: dataclasses that serialize with ``lora_jax.config.Serializable`` (the same
``to_dict`` / ``from_dict`` as ``LoraConfig``) and generate the command line's flags.

Every field is one ``--flag`` (``batch_size`` -> ``--batch-size``) whose help is the field's
``metadata["help"]``; a bool field is a switch. Checks raise ``OptionError`` naming the field;
the command line translates the field into its flag.
"""

from __future__ import annotations

import dataclasses
import numbers
import re

from lora_jax.config import BIASES, Serializable


INITS = ("kaiming", "gaussian", "pissa", "olora")


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions(Serializable):
  """What every task's run needs: the adapter, the optimizer, the step budget, the devices."""

  rank: int = option(8, "LoRA rank r")
  alpha: float = option(16.0, "LoRA alpha (the scale is alpha / rank)")
  targets: str = option("q,v", "q,v (default), all-linear, family aliases or path patterns")
  lora_dropout: float = option(0.0, "dropout on the LoRA branch's input (PEFT's lora_dropout)")
  variant: str = option("lora", "lora, or dora: a trained magnitude per output column rescales "
                                "W + s·A@B (PEFT's use_dora)", choices=("lora", "dora"))
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
    if self.variant not in ("lora", "dora"):
      raise OptionError("variant", f"must be lora or dora, got {self.variant!r}.")
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
    _positive("epochs", self.epochs)
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
