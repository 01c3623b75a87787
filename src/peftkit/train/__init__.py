"""Training on top of the peftkit library: the engine, the tasks, data, reports, distribution.

- ``engine``: the one training loop (``run_training``) for every task, one process or many.
- ``task`` / ``tasks``: what a task gives the engine; the known tasks and task inference.
- ``classify``, ``causal_lm``, ``image_classify``: the tasks, with their data readers
  (``data``, ``lm_data``, ``image_data``), ``eval`` and ``merge``; ``generate`` for causal LMs.
- ``loop``, ``checkpoint``, ``distributed``: schedules and data order; checkpoints; torchrun.
- ``options``, ``methods``, ``models``, ``adapted``, ``report``, ``rundir``, ``progress``: shared pieces.

The library core never imports from here.
"""
