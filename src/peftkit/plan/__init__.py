"""``peftkit plan``: the peak memory of a training run, predicted from the model's config alone.

Nothing is allocated for the model: it is built from its config under torch's ``FakeTensorMode``
(tensors with shapes, dtypes and devices but no data), the method is applied to it with
``peftkit.apply`` and ``build_config`` exactly as the trainer does, and then two training steps of
the trainer (forward and loss under the same autocast, backward, gradient clipping, AdamW's step,
``zero_grad(set_to_none=True)``) run on a fake batch of the given shape. ``Live`` — a
``TorchDispatchMode`` — sees every tensor an operation creates, including those the autograd engine
creates in the backward pass, and follows each storage until it is freed (a weak reference on the
storage), so the sum of the live storages over time is the run's memory curve as the program asks
for it; its maximum is the prediction. Nothing is fitted to measurements: what the CPU's allocator
adds on top is what the validation (``benchmarks/plan_validate.py``, ``docs/plan.md``) measures.

The peak is split at the moment it is reached into the base weights, the adapter weights (what
``apply`` added: new matrices, trained copies of heads), the gradients then alive, AdamW's state,
and the rest: activations kept for the backward pass and the temporaries of the operation running
then. A 4-bit base (``--quantize``, ``--method qlora``) cannot be built on fake tensors
(bitsandbytes quantizes real data), so the method runs over the float layers and the 4-bit bytes
of the weights are counted from the shapes (bitsandbytes' NF4 layout with double quantization, as
``peftkit.quantize`` makes it); the dense weight each 4-bit layer dequantizes in its forward and
backward passes is added to the peak.
"""

from .case import (FULL, HEADROOM, RANKS, TASKS, VALIDATED_CPU, Case, build_model, enable_checkpointing, fake_batch,
                   human, infer_task, load_config, loss_sum, parse_bytes, peft_config, prepare, train_options,
                   train_steps)
from .predict import Live, Plan, four_bit_bytes, predict, predict_here, predict_many, quantized_layers
from .search import RULE, Candidate, search

__all__ = ["FULL", "HEADROOM", "RANKS", "RULE", "TASKS", "VALIDATED_CPU", "Candidate", "Case", "Live", "Plan",
           "build_model", "enable_checkpointing", "fake_batch", "four_bit_bytes", "human", "infer_task",
           "load_config", "loss_sum", "parse_bytes", "peft_config", "predict", "predict_here", "predict_many",
           "prepare", "quantized_layers", "search", "train_options", "train_steps"]
