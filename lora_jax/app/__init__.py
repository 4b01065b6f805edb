"""The ``lora-jax`` application, built on the library the way a user would build on it.

``cli`` (the command line, its flags generated from the options dataclasses), ``runner`` (the
task-agnostic loop: run folders, resume, Ctrl-C, multi-host, metrics, checkpoints through
``lora_jax.checkpoint`` and steps through ``lora_jax.train_step``), ``data`` (file readers and
the embedded default dataset) and one module per task (``classify``). Its dependencies
(tokenizers, vadersentiment, matplotlib, tqdm, tensorboardX, PyYAML) are the ``app`` extra:
``pip install -e ".[app]"``. ``import lora_jax`` never imports this package.
"""
