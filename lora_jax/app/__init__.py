"""The ``lora-jax`` application, built on the library the way a user would build on it.

``cli`` (the command line, its flags generated from the options dataclasses; it names no task),
``tasks`` (the task records the command line goes through), ``runner`` (the task-agnostic
loop: run folders, resume, Ctrl-C, multi-host, metrics, checkpoints through
``lora_jax.checkpoint`` and steps through ``lora_jax.train_step``), ``saved`` (loading,
merging and exporting saved runs), ``data`` (file readers and the embedded default dataset)
and one module or package per task (``classify``, ``causal``), with ``serve`` (the HTTP
server over a decoder's adapters). Its dependencies (tokenizers, vadersentiment, matplotlib,
tqdm, tensorboardX, PyYAML) are the ``app`` extra: ``pip install -e ".[app]"``.
``import lora_jax`` never imports this package.
"""
