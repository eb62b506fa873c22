"""Flora's small shared core: what every stage needs and no stage owns.

* ``flora.errors``: ``FloraError`` (the base of every anticipated failure) and ``fail``, the one way a
  command reports one: ``flora <stage>: error: <what was found, what was expected>``, exit status 2.
* ``flora.config``: YAML -> typed dataclasses, unknown keys rejected, dotted overrides.
* ``flora.io``: JSONL, atomic writes, sha256 of a file.
* ``flora.distributed``: torchrun's environment (rank, world size, local rank).
* ``flora.cli``: the ``flora <stage> <verb>`` command.

Stage code lives in the stages (``sharding/``, ``loaders/``, ``training/``, ``export/``).
"""
