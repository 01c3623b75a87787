"""Training on top of the peftkit library: data, loop, reports, and the task recipes.

- ``data``: reading and checking labelled files, the label mapping, hold-out split, batches.
- ``loop``: AdamW with linear warmup/decay, the training loop, evaluation.
- ``report``: ``metrics.jsonl``, ``summary.json``, ``loss.png`` (atomic writes).
- ``classify``: the sequence-classification recipe behind ``peftkit train/eval/merge``.
- ``options``, ``methods``, ``models``, ``rundir``, ``progress``: the pieces the recipes share.

The library core never imports from here.
"""
