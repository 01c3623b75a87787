"""``peftkit compare``: every method trained on the user's own model, data, budget and seeds,
and the claims made for PEFT checked on the results: quality against trainable parameters and
bytes, time and memory, forgetting beside full fine-tuning, the train–eval gap, learning curves.

- ``data``: one evaluation set and nested, seeded training subsets for every run;
- ``runner``: the runs (``DIR/runs/<method>-s<seed>-n<size>/``), each in a fresh process
  (``child``) so that its peak memory is its own, the live progress line, ``--resume``;
- ``report``: ``compare.json``'s summary and ``compare.md``'s tables (best of a column marked);
- ``html`` and ``svg``: ``compare.html``, one self-contained page with inline SVG figures;
- ``cli``: the click command. See docs/compare.md.
"""
