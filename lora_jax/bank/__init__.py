"""Many adapters on one frozen base: an adapter bank, selection by index, mixed batches and
multi-task training.

An ``AdapterBank`` stacks named adapter trees (different targets, ranks and alphas, over one
base) to common shapes: every adapted path of any adapter is in the bank; ranks are zero-padded
to the largest (zero columns of A and rows of B add exact zeros); an adapter that does not
target a path has zero factors there; each adapter's scale is an array, not a static field.
Trained extras (``modules_to_save``, such as a classifier head) are stacked whole, the base
leaf standing in where an adapter has none. One more slot, ``NO_ADAPTER`` (-1), is the base
model itself: zero factors, scale 0, the base leaves.

Since every choice is data of fixed shapes, choosing another adapter, changing an alpha or
putting a new adapter of the same shapes into a slot never retraces a jitted function:

    bank = lora_jax.bank.stack({"sst2": sst2, "vader": vader}, base)
    adapted = lora_jax.lora(model.apply)
    y = adapted(base, bank.pick(bank.index("sst2")), x)       # one adapter for the batch
    y = adapted(base, bank, x, adapter_index=jnp.array([0, 1, -1]))  # one per example

With ``adapter_index`` each example runs with its own adapter, as if alone (``mixed``): a
bank of adapters alone runs the batch as one, each adapted product gathering every row's own
factors where it runs (S-LoRA's and Punica's batched gather: ``x @ W`` stays one product for
all rows); a bank with trained extras (a head per task) runs ``jax.vmap`` over the examples,
each with its own extras.

The bank's layout is in ``bank.slots``, the bank and its files in ``bank.store``, mixed batches
and multi-task training in ``bank.mixed``; ``lora(fn)`` runs a bank through
``lora_jax.transform.register_container``.
"""

from lora_jax.bank.mixed import mixed, multi_task_step
from lora_jax.bank.slots import NO_ADAPTER, LoraArrays, SlotLora, Slots, traced_scales
from lora_jax.bank.store import AdapterBank, load, read, stack

__all__ = ["NO_ADAPTER", "AdapterBank", "LoraArrays", "SlotLora", "Slots", "load", "mixed",
           "multi_task_step", "read", "stack", "traced_scales"]
