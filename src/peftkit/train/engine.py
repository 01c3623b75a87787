"""The training engine: one loop for every task, in one process or many.

``run_training(options, console)`` is the whole ``peftkit train`` job. Read ``Engine.fit`` top
to bottom: optimizer steps over windows of ``--grad-accum`` micro-batches, evaluation every
``--eval-steps`` steps (or every epoch), a checkpoint every ``--save-steps`` steps, early
stopping, and at the end the adapter (the last one, or with ``--keep-best`` the best evaluated).
``--method full`` trains the model itself instead, through the same loop: no adapter is applied,
every parameter trains, and ``model/`` (a whole transformers model) takes the place of
``adapter/`` (``full.py`` has what differs).

A step's loss is the sum of the window's per-item losses over every process divided by the
number of items (``Task.count``) in the whole window on every process, so gradient accumulation
and data parallelism take the same step as one large batch. Resuming restores the trainable
parameters, the optimizer, the schedule, every process's RNG state and the position in the
data, and reaches the adapter an uninterrupted run reaches (the data order never touches the
global RNG: ``loop.ShardOrder``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import peftkit

from .. import ConfigError, ModelError
from . import checkpoint, distributed, full, rundir
from .data import HOLDOUT_FRACTION
from .distributed import World
from .. import eva, optim
from ..registry import TrainingHooks
from ..methods import lora_init
from .loop import ShardOrder, make_optimizer, make_schedule, seed_everything
from .methods import build_config, describe
from .models import BUILTIN
from .options import CLI_METHODS, TrainOptions, is_full
from .progress import Console
from .report import MetricsLog, TensorBoard, plot_loss, write_json
from .task import Task, TaskData
from .tasks import make_task

ADAPTER = "default"
OPTIONS_FILE = "options.json"  # the run's options, for --resume
BEST_DIR = "best"
EVA_MAX_BATCHES = 200  # --init eva: forward passes at most before EVA settles for what it has (a warning)



@dataclass
class Position:
    """Where a run is; saved in every checkpoint (``state.json``)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # micro-batches of that epoch already used, per process
    before: dict[str, Any] | None = None  # evaluation before training
    last: dict[str, Any] | None = None  # latest evaluation
    last_step: int | None = None
    best: dict[str, Any] | None = None  # best evaluation during training
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best
    stopped_early: bool = False
    world_size: int = 1
    eval_seconds: float = 0.0
    train_seconds: float = 0.0


@dataclass
class Setup:
    data: TaskData
    model: nn.Module  # the user's model with the adapter (unwrapped)
    module: nn.Module  # what the step calls: the model, DDP around it, or FSDP-sharded
    model_path: str
    train_loader: DataLoader
    eval_loader: DataLoader
    order: ShardOrder
    params: list[nn.Parameter] = field(default_factory=list)


def run_training(options: TrainOptions, console: Console, resume: bool = False) -> dict[str, Any] | None:
    """Train (or with ``resume``, continue ``options.out``); returns ``summary.json`` on rank 0."""
    world = distributed.setup(options.device)
    try:
        engine = Engine(options, console if world.main else Console(silent=True), world)
        result = engine.run(resume)
        # Leave together: rank 0 writes the run's last files after the others are done, and a
        # process group torn down while a peer still holds it can leave that peer waiting (seen
        # once in 2-process CI runs). On an error no barrier: the process exits and torchrun ends the rest.
        distributed.barrier(world)
        return result
    finally:
        distributed.teardown(world)


def read_run_options(out: str) -> TrainOptions:
    """The options a run in ``out`` was started with (``--resume``)."""
    from .options import build_options

    path = Path(out) / OPTIONS_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {out}: no {OPTIONS_FILE} here; not a peftkit run directory")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    options = build_options(values, {}, source=str(path), saved=True)
    options.out = str(out)
    return options


class Engine:
    def __init__(self, options: TrainOptions, console: Console, world: World) -> None:
        self.options, self.console, self.world = options, console, world
        # every process must use rank 0's directory (a default name holds the time of day)
        self.out = Path(distributed.gather_objects(world, options.out or rundir.default_out(options.method))[0])
        self.pos = Position(world_size=world.size)
        self.full = is_full(options.method)  # --method full: no adapter, the whole model trains
        self.metrics: MetricsLog | None = None
        self.board: TensorBoard | None = None

    # -- the job ---------------------------------------------------------------------------

    def run(self, resume: bool) -> dict[str, Any] | None:
        started = time.time()
        o, console = self.options, self.console
        ckpt = self._checkpoint_to_resume() if resume else None
        console.essential(f"output: {self.out}" + (f" (resuming from {ckpt.name})" if ckpt else ""))
        self.task: Task = make_task(o)
        self._check_options()
        self._resume_ckpt = ckpt  # an EVA adapter is rebuilt from it (_init_adapter)
        self.setup = self._build()
        if ckpt is not None:
            self._restore(ckpt)
        if self.world.main:
            if ckpt is None:
                self._clear_earlier_run()
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / OPTIONS_FILE, o.to_dict())
            self.metrics = MetricsLog(self.out / "metrics.jsonl", keep_until=self.pos.step if ckpt else None)
            if o.tensorboard:
                self.board = TensorBoard(self.out / "tensorboard", resume_step=self.pos.step if ckpt else None)
        distributed.barrier(self.world)
        if self.pos.before is None:
            self.pos.before = self._evaluate("eval (before)")
            self._log_eval(0, self.pos.before)
            console.essential(f"before training: {self.task.eval_text(self.pos.before)}")
        self.fit()
        adapter_result, adapter_step = self._finish_adapter()
        summary = self._summary(adapter_result, adapter_step, started) if self.world.main else None
        if self.board is not None:
            self.board.close()
        return summary

    def _clear_earlier_run(self) -> None:
        """A fresh run in the directory of an earlier one: its checkpoints, best adapter and
        TensorBoard log go (a later --resume must not continue the earlier run's checkpoints)."""
        import shutil

        stale = [self.out / d for d in (checkpoint.DIR, BEST_DIR, "tensorboard") if (self.out / d).exists()]
        stale += full.stale_outputs(self.out, self.full, self.setup.model_path)  # the other kind's adapter/ or model/
        for path in stale:
            shutil.rmtree(path)
        if stale:
            self.console.info(f"replaced an earlier run's {', '.join(p.name + '/' for p in stale)} in {self.out}")

    def _check_options(self) -> None:
        o = self.options
        if not self.full:
            build_config(o)  # the method's own values (--init, an even --r for orthogonal) before anything is loaded
        if o.bf16 and self.world.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--bf16: this GPU does not support bfloat16; drop --bf16")
        # full fine-tuning: DDP, FSDP, gradient checkpointing and bf16 all apply (the options refused --quantize)
        method = None if self.full else CLI_METHODS[o.method][0]
        if method is not None and o.fsdp and method.input_method:
            weight_side = ", ".join(n for n, (m, _) in CLI_METHODS.items() if not m.input_method)
            raise ConfigError(f"--fsdp shards weight-side adapters ({weight_side}); --method {o.method} "
                              "trains a few virtual tokens: drop --fsdp")
        if method is not None and o.gradient_checkpointing and not method.gradient_checkpointing:
            raise ConfigError(f"--gradient-checkpointing recomputes the layers without their key/value cache, "
                              f"which --method {o.method} needs; drop one of --gradient-checkpointing and "
                              f"--method {o.method}")
        if o.lora_fa and o.fsdp:
            raise ConfigError("--lora-fa with --fsdp is not supported (the projection needs whole A matrices); "
                              "drop one of them")
        if o.lora_fa and o.loraplus_lr_ratio is not None:
            raise ConfigError("--lora-fa freezes A, so --loraplus-lr-ratio would only raise B's learning rate "
                              "over the head's; drop one of them (or raise --lr)")
        if o.save_limit is not None and o.save_steps is None:
            raise ConfigError("--save-limit keeps the most recent checkpoints; set --save-steps N to write them")
        if o.early_stopping is not None and o.eval_steps is None and o.epochs < 2 and o.max_steps is None:
            raise ConfigError("--early-stopping counts evaluations; with one epoch and no --eval-steps there is "
                              "only one: set --eval-steps N")

    def _build(self) -> Setup:
        o, console, world = self.options, self.console, self.world
        data = self.task.load_data()
        seed_everything(o.seed)  # before the model: a new head's weights and LoRA's A draw from it
        model, model_path = self.task.load_model(data, world.device)
        if self.full:
            config = None
            full.prepare(model)
        else:
            config = build_config(o, self.task.peft_task_type, self.task.modules_to_save)
            late = bool(o.quant_type) and lora_init.quantizes_after(config)  # PiSSA/LoftQ: quantize what the init wrote
            if o.quant_type and not late:
                peftkit.quantize(model, quant_type=o.quant_type)
            peftkit.apply(model, config)
            if late:
                lora_init.quantize_base(model, quant_type=o.quant_type)
            self._init_adapter(model, data, config)
        if o.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        summary = peftkit.trainable_summary(model)
        console.info(f"task: {self.task.name}; model: {o.model} ({model_path}) on {world.device}"
                     + (f", {world.size} processes" + (" (FSDP)" if o.fsdp else " (DDP)") if world.distributed else ""))
        rows = f" in {len(data.train)} packed rows" if data.train_count != len(data.train) else ""
        console.info(f"data: {data.train_count} training examples{rows} from {data.train_source}, "
                     f"{len(data.eval)} evaluation examples from {data.eval_source}")
        for line in data.lines:
            console.info(line)
        if self.full:
            console.info(full.console_line(summary.trainable, summary.total, summary.percent))
        else:
            console.info(f"{o.method}: {describe(config)}, targets {_targets_text(config, model)}; trainable params "
                         f"{summary.trainable:,} of {summary.total:,} ({summary.percent:.2f}%)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ModelError("the model has no trainable parameters")
        module = distributed.wrap(model, world, o.fsdp)
        order = ShardOrder(len(data.train), o.seed, shuffle=True, rank=world.rank, world=world.size)
        train_loader = DataLoader(data.train, batch_size=o.batch_size, sampler=order, collate_fn=data.collate,
                                  generator=torch.Generator())
        eval_loader = DataLoader(_EvalShard(data.eval, world), batch_size=o.batch_size, shuffle=False,
                                 collate_fn=_KeepCollate(data.collate), generator=torch.Generator())
        if len(train_loader) == 0:
            raise ConfigError("no training batches: the training data is empty")
        s = Setup(data, model, module, model_path, train_loader, eval_loader, order,
                  [p for p in module.parameters() if p.requires_grad])
        self.optimizer = make_optimizer(  # LoRA+'s B and LoRA-FA's projection from the (wrapped) units
            [(n, p) for n, p in module.named_parameters() if p.requires_grad], o.lr, o.weight_decay,
            rates=optim.lora_plus_rates(model, o.lr, o.loraplus_lr_ratio, names=ADAPTER) if o.loraplus_lr_ratio else None,
            projections=optim.lora_fa_projections(model, ADAPTER) if o.lora_fa else None)
        self.micro_per_epoch = -(-order.per_process() // o.batch_size)
        self.steps_per_epoch = -(-self.micro_per_epoch // o.grad_accum)
        self.total = o.max_steps if o.max_steps is not None else o.epochs * self.steps_per_epoch
        self.scheduler = make_schedule(o.scheduler, self.optimizer, int(self.total * o.warmup_ratio), self.total)
        self.base_lrs = list(self.scheduler.base_lrs)  # each group's peak rate under these options (_override_lr)
        # what the method needs from the loop (registry); full fine-tuning: nothing
        self.hooks = TrainingHooks() if self.full else CLI_METHODS[o.method][0].training
        if self.hooks.begin is not None:
            self.hooks.begin(model, ADAPTER, self.total)
        global_batch = o.batch_size * o.grad_accum * world.size
        console.info(f"training: {self.total} steps ({self.total / self.steps_per_epoch:.3g} epochs of "
                     f"{self.steps_per_epoch} steps), {global_batch} examples a step ({o.batch_size} x "
                     f"{o.grad_accum} accumulated x {world.size} processes), lr {o.lr:g} {o.scheduler}"
                     + (", bf16 autocast" if o.bf16 else "") + (", gradient checkpointing" if o.gradient_checkpointing else ""))
        return s

    def _init_adapter(self, model: nn.Module, data: TaskData, config: Any) -> None:
        """What the adapter needs after ``peftkit.apply``: EVA's A from the data
        (``init_lora_weights="eva"``; on ``--resume`` the checkpoint's layout and tensors instead,
        so the ranks cannot come out otherwise), then LoRA-FA's frozen A (``--lora-fa``)."""
        o = self.options
        if getattr(config, "init_lora_weights", None) == "eva":
            ckpt = getattr(self, "_resume_ckpt", None)
            if ckpt is not None:
                eva.rebuild_from_file(model, ckpt / checkpoint.ADAPTER_DIR, ADAPTER)
            else:
                t = time.time()
                # epoch 0's batches in the training order, the same on every process (no global RNG)
                loader = DataLoader(data.train, batch_size=o.batch_size, collate_fn=data.collate,
                                    sampler=ShardOrder(len(data.train), o.seed, shuffle=True),
                                    generator=torch.Generator())
                found = eva.get_eva_state_dict(model, loader, ADAPTER, forward_fn=self.task.loss_sum,
                                               max_batches=EVA_MAX_BATCHES)
                found = distributed.gather_objects(self.world, {k: v.cpu() for k, v in found.items()})[0]
                eva.load_eva_state_dict(model, found, ADAPTER)
                ranks = [v.shape[0] for v in found.values()]
                self.console.info(f"EVA: {len(ranks)} layers initialised from the data in {time.time() - t:.1f} s; "
                                  f"ranks {min(ranks)}-{max(ranks)} (sum {sum(ranks)})"
                                  + (f", {ranks.count(0)} layer(s) dropped (rank 0)" if 0 in ranks else ""))
        if o.lora_fa:
            optim.freeze_lora_a(model, ADAPTER)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> None:
        o, s, pos = self.options, self.setup, self.pos
        if pos.step >= self.total or pos.stopped_early:
            return
        t0 = time.time()
        eval_before = pos.eval_seconds
        s.module.train()  # dropout on (the model loads in eval mode; _evaluate switches back)
        with self.console.progress(self.total - pos.step, "train") as bar:
            while pos.step < self.total and not pos.stopped_early:
                s.order.set_position(pos.epoch, pos.batch * o.batch_size)
                window: list[dict[str, torch.Tensor]] = []
                for batch in s.train_loader:
                    window.append(batch)
                    if len(window) < o.grad_accum and pos.batch + len(window) < self.micro_per_epoch:
                        continue
                    self._step(window, bar)
                    window = []
                    if pos.step >= self.total or pos.stopped_early:
                        break
                else:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
        pos.train_seconds += time.time() - t0 - (pos.eval_seconds - eval_before)

    def _step(self, window: list[dict[str, torch.Tensor]], bar: Any) -> None:
        o, s, pos, world = self.options, self.setup, self.pos, self.world
        counts = [self.task.count(b) for b in window]
        (total,) = distributed.sum_across(world, [float(sum(counts))])
        if total <= 0:
            raise ModelError(f"step {pos.step + 1}: no items to compute a loss on in this batch")
        window_loss = torch.zeros((), device=world.device)
        for i, batch in enumerate(window):
            batch = {k: v.to(world.device) for k, v in batch.items()}
            with distributed.gradient_sync(s.module, sync=i == len(window) - 1):
                with self._autocast():
                    part = self.task.loss_sum(s.module, batch)
                    term = part * (world.size / total)
                    if i == len(window) - 1 and self.hooks.loss is not None:  # once a step (AdaLoRA's regulariser)
                        extra = self.hooks.loss(s.model, ADAPTER)
                        term = term + extra if extra is not None else term
                term.backward()
            window_loss += part.detach()
        (loss_sum,) = distributed.sum_across(world, [window_loss.item()])  # one device sync a step
        loss = loss_sum / total
        if not math.isfinite(loss):
            raise self._diverged(pos.step + 1, f"the loss became {loss}")
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(s.params, o.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        if self.hooks.step is not None:  # the step's gradients are still there (AdaLoRA's allocation)
            self.hooks.step(s.model, ADAPTER, pos.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        pos.batch += len(window)
        if self.metrics is not None:
            self.metrics.step(pos.step, loss, lr)
        if self.board is not None:
            self.board.step(pos.step, loss, lr)
        bar.update(1, loss=loss, lr=lr)
        epoch_end = pos.batch >= self.micro_per_epoch
        if (pos.step % o.eval_steps == 0 if o.eval_steps is not None else epoch_end) or pos.step >= self.total:
            self._eval_during_training()  # before the checkpoint below, so that it holds this evaluation
        if o.save_steps is not None and pos.step % o.save_steps == 0:
            self._save_checkpoint()

    def _autocast(self):
        if not self.options.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16)

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, desc: str) -> dict[str, Any]:
        """Every process evaluates its share; the sums are added across processes."""
        s, world = self.setup, self.world
        module = s.module if self.options.fsdp else s.model
        t = time.time()
        with self.console.progress(len(s.eval_loader), desc, lines=False) as bar:
            totals = self.task.eval_totals(module, s.eval_loader, world.device, bar, self._autocast)
        keys = sorted(totals)
        totals = dict(zip(keys, distributed.sum_across(world, [totals[k] for k in keys])))
        self.pos.eval_seconds += time.time() - t
        return self.task.finish_eval(totals)

    def _eval_during_training(self) -> None:
        """Evaluate at this step; track the best (saved to ``best/``) and early stopping."""
        o, pos, task = self.options, self.pos, self.task
        result = self._evaluate(f"eval (step {pos.step})")
        pos.last, pos.last_step = result, pos.step
        self._log_eval(pos.step, result)
        value = result[task.metric]
        better = pos.best is None or (value > pos.best[task.metric] if task.higher_is_better
                                      else value < pos.best[task.metric])
        mark = ""
        if better:
            pos.best, pos.best_step, pos.bad_evals = result, pos.step, 0
            if o.keep_best:
                self._write_adapter(self.out / BEST_DIR)
                mark = " (best so far, saved)"
        else:
            pos.bad_evals += 1
            if o.early_stopping is not None and pos.bad_evals >= o.early_stopping:
                pos.stopped_early = True
                mark = f" (no better than step {pos.best_step} for {pos.bad_evals} evaluations: stopping early)"
        self.console.info(f"step {pos.step} (epoch {pos.step / self.steps_per_epoch:.2f}): "
                          f"eval {task.eval_text(result)}{mark}")

    def _log_eval(self, step: int, result: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.eval(step, result)
        if self.board is not None:
            self.board.eval(step, result)

    # -- files -------------------------------------------------------------------------------

    def _write_adapter(self, directory: Path) -> None:
        """The adapter (a full run: the model) as it is now, with the task's files, atomically
        at ``directory`` (rank 0)."""
        tensors = self._model_tensors() if self.full else self._adapter_tensors()
        if self.world.main:
            checkpoint.write_dir(directory, lambda tmp: self._fill_adapter(tmp, tensors))
        distributed.barrier(self.world)

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor whole (gathered from every process under FSDP: a collective).

        Refuses a state whose tensors are not finite (a step with a finite loss can still make
        them inf or NaN): no checkpoint, ``best/`` or ``adapter/`` is written of it."""
        live = peftkit.io.adapter_tensors(self.setup.model, ADAPTER)
        tensors = {k: distributed.full_tensor(t.detach()).cpu() for k, t in live.items()}
        bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
        if bad is not None:
            raise self._diverged(self.pos.step, f"the adapter's tensor {bad} is no longer finite (inf or nan)")
        return tensors

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """A full run's whole model (gathered under FSDP: a collective), refused as
        ``_adapter_tensors`` refuses an adapter when a tensor is no longer finite."""
        self._check_model_finite()
        return full.model_tensors(self.setup.model)

    def _check_model_finite(self) -> None:
        bad = full.first_nonfinite(self.setup.model, self.world)
        if bad is not None:
            raise self._diverged(self.pos.step, f"the model's tensor {bad} is no longer finite (inf or nan)")

    def _diverged(self, step: int, what: str) -> ModelError:
        """The one-line error of a run whose numbers blew up: the step, the last good
        checkpoint, and how to continue from it."""
        o = self.options
        lower = f"--lr {o.lr / 10:g} (lower than the current {o.lr:g})"
        extra = (", --max-grad-norm 1 (clipping is off)" if not o.max_grad_norm else "") + \
                (", --no-bf16 (float32)" if o.bf16 else "")
        ckpt = checkpoint.latest(self.out)
        if ckpt is not None:
            how = (f"the last good checkpoint {ckpt} is kept: continue from it with "
                   f"peftkit train --resume {self.out} {lower}{extra}")
        else:
            how = (f"there is no checkpoint to resume from (--save-steps N writes them): start again "
                   f"with {lower}{extra}")
        return ModelError(f"step {step}: {what}; training stopped and this state was not saved; {how}")

    def _fill_adapter(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        if self.full:
            s = self.setup
            full.fill_model_dir(directory, s.model, tensors, self.task, s.data, s.model_path, self._train_args())
            return
        peftkit.io.write_files(self.setup.model, directory, ADAPTER, tensors=tensors)
        self.task.save_files(directory, self.setup.data)
        write_json(directory / rundir.ARGS_FILE, self._train_args())

    def _save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        pos = self.pos
        if self.full:  # trainer_state.pt holds every parameter already: no model/ beside it
            self._check_model_finite()
            tensors = None
        else:
            tensors = self._adapter_tensors()
        model_sd, optim_sd = get_state_dict(
            self._state_module(), self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        rngs = distributed.gather_objects(self.world, checkpoint.rng_state())
        if self.world.main:
            trainer = {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "rng": rngs}
            if self.hooks.state is not None:  # what the method keeps beyond its parameters (TrainingHooks)
                trainer["method"] = self.hooks.state(self.setup.model, ADAPTER)

            def fill(tmp: Path) -> None:
                if tensors is not None:
                    self._fill_adapter(tmp / checkpoint.ADAPTER_DIR, tensors)
                checkpoint.save_torch(trainer, tmp / checkpoint.TRAINER_FILE)
                write_json(tmp / checkpoint.STATE_FILE, asdict(pos))

            checkpoint.write_checkpoint(self.out, pos.step, fill)
            self.console.info(f"checkpoint: {checkpoint.step_dir(self.out, pos.step)}")
            if self.options.save_limit is not None:
                checkpoint.prune(self.out, self.options.save_limit)
        distributed.barrier(self.world)

    def _state_module(self) -> nn.Module:
        return self.setup.module if self.options.fsdp else self.setup.model

    def _checkpoint_to_resume(self) -> Path:
        ckpt = checkpoint.latest(self.out)
        if ckpt is None:
            raise ConfigError(f"--resume {self.out}: no complete checkpoint in {self.out / checkpoint.DIR} "
                              "(a run writes them with --save-steps N)")
        return ckpt

    def _restore(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state, trainer = checkpoint.read_state(ckpt)
        if state.get("world_size", 1) != self.world.size:
            raise ConfigError(f"{ckpt}: written by {state.get('world_size', 1)} process(es); resume with "
                              f"--nproc {state.get('world_size', 1)} (the data order and RNG states depend on it)")
        set_state_dict(self._state_module(), self.optimizer, model_state_dict=trainer["model"],
                       optim_state_dict=trainer["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        self.scheduler.load_state_dict(trainer["scheduler"])
        if self.hooks.load_state is not None and trainer.get("method") is not None:
            self.hooks.load_state(self.setup.model, ADAPTER, trainer["method"])
        self._override_lr()
        checkpoint.set_rng_state(trainer["rng"][self.world.rank])
        known = {f for f in Position.__dataclass_fields__}
        self.pos = Position(**{k: v for k, v in state.items() if k in known})

    def _override_lr(self) -> None:
        """After restoring a checkpoint: ``--resume --lr`` changes the peak rate of the schedule
        from here on (the current rate scaled with it; the schedule's shape stays)."""
        fresh = self.base_lrs  # each group's peak under the current options (LoRA+'s B: ratio x --lr)
        saved = list(self.scheduler.base_lrs)
        if saved == fresh:
            return
        for group, base, peak in zip(self.optimizer.param_groups, saved, fresh):
            group["lr"] = group["lr"] * peak / base
            group["initial_lr"] = peak
        self.scheduler.base_lrs = list(fresh)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _finish_adapter(self) -> tuple[dict[str, Any], int]:
        """Write ``adapter/`` (a full run: ``model/``): the best evaluated adapter with
        ``--keep-best``, else the last."""
        o, pos = self.options, self.pos
        final = self.out / (rundir.MODEL_DIR if self.full else rundir.ADAPTER_DIR)
        if o.keep_best and pos.best is not None:  # the same answer on every process (no file test)
            if self.world.main:
                checkpoint.write_dir(final, lambda tmp: checkpoint.copy_files(self.out / BEST_DIR, tmp))
            distributed.barrier(self.world)
            return pos.best, pos.best_step
        self._write_adapter(final)
        return pos.last or pos.before, pos.step

    def _train_args(self) -> dict[str, Any]:
        """What ``eval``/``merge``/``generate`` need to rebuild the run's model and inputs."""
        o = self.options

        def absolute(p: str | None) -> str | None:
            return os.path.abspath(p) if p else None

        return {
            "task": self.task.name,
            "model": o.model if o.model in BUILTIN and not os.path.isdir(o.model) else absolute(o.model),
            "max_length": o.max_length,
            "batch_size": o.batch_size,
            "data": absolute(o.data),  # null: the bundled demo set
            "eval_data": absolute(o.eval_data),  # null with data set: held out of data
            "holdout_fraction": HOLDOUT_FRACTION,
            "seed": o.seed,
            "options": o.to_dict(),
        }

    def _summary(self, result: dict[str, Any], adapter_step: int, started: float) -> dict[str, Any]:
        o, pos, s, task = self.options, self.pos, self.setup, self.task
        adapter_dir = self.out / (rundir.MODEL_DIR if self.full else rundir.ADAPTER_DIR)
        before = pos.before or {}
        assert self.metrics is not None
        steps_x, losses = self.metrics.train_points()
        plot_loss(self.out / "loss.png", steps_x, losses, self.metrics.eval_points(), metric=task.metric,
                  title=f"{o.method} on {Path(o.model).name}: loss"
                        + (f" (eval points labelled with {task.metric})" if task.metric != "loss" else ""))
        params = peftkit.trainable_summary(s.model)
        # a full run: the model's safetensors, what the task costs on disk
        adapter_bytes = (rundir.weights_bytes(adapter_dir) if self.full
                         else (adapter_dir / rundir.WEIGHTS_FILE).stat().st_size)
        summary = {
            "eval": result,  # of the adapter in adapter/
            "adapter_step": adapter_step,
            "adapter_is": "best" if o.keep_best and adapter_step == pos.best_step and pos.best is not None else "last",
            "metric": task.metric,
            "eval_before": before,
            "best_step": pos.best_step,
            "stopped_early": pos.stopped_early,
            "trainable_params": params.trainable,
            "total_params": params.total,
            "trainable_percent": params.percent,
            "adapter_bytes": adapter_bytes,
            "base_bytes": peftkit.quant.weight_bytes(s.model),  # 4-bit (with scales) vs 16/32-bit
            "train_seconds": round(pos.train_seconds, 3),
            "total_seconds": round(time.time() - started, 3),
            "method": o.method,
            "model": o.model,
            "model_path": s.model_path,
            "task": task.name,
            "train_examples": s.data.train_count,
            "train_rows": len(s.data.train),  # what a batch counts: examples, or packed rows
            "eval_data": s.data.eval_source,
            "steps": pos.step,
            "epochs": round(pos.step / self.steps_per_epoch, 3),
            "global_batch": o.batch_size * o.grad_accum * self.world.size,
            "processes": self.world.size,
            "device": str(self.world.device),
            # rank 0's peak GPU memory over the whole run (weights, activations, optimizer state)
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(self.world.device) if self.world.device.type == "cuda"
            else None,
            "seed": o.seed,
            "options": o.to_dict(),
            "peftkit_version": peftkit.__version__,
        }
        if "accuracy" in before:
            summary["accuracy_before"] = before["accuracy"]
        summary.update(self.task.summary_extras(s.data))
        write_json(self.out / "summary.json", summary)
        what = "model" if self.full else "adapter"
        self.console.essential(f"after training ({summary['adapter_is']} {what}, step {adapter_step}): "
                               f"{task.eval_text(result)}; before: {task.eval_text(before)}")
        size = f"{adapter_bytes / 2**20:.1f} MB" if self.full else f"{adapter_bytes / 1024:.0f} KB"
        self.console.essential(f"saved: {adapter_dir} ({size}), metrics.jsonl, summary.json, "
                               f"loss.png in {self.out}")
        return summary


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing: gradients reach the adapter inside a block also when the block's
    input (a frozen embedding's output) does not require grad, the trap of the reentrant kind."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name (the old one goes in v6)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


class _EvalShard(Dataset):
    """This process's share of the evaluation set: ``(item, keep)``; every process gets the same
    number of items, the short ones padded with repeats marked ``keep=False``."""

    def __init__(self, dataset: Dataset, world: World) -> None:
        n = len(dataset)
        per = -(-n // world.size)
        self.dataset = dataset
        self.positions = [p for p in range(world.rank, per * world.size, world.size)] if n else []
        self.n = n

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Any, bool]:
        p = self.positions[i]
        return self.dataset[p % self.n], p < self.n


class _KeepCollate:
    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, bool]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.collate([x for x, _ in items]), torch.tensor([k for _, k in items], dtype=torch.bool)


def _targets_text(config: Any, model: nn.Module) -> str:
    """The configured targets, or the method's default for this model type."""
    if not hasattr(config, "target_modules"):
        return "none (virtual tokens at the input)"
    targets = config.target_modules
    if targets is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        targets = peftkit.registry.get(config.peft_type).default_targets.get(kind)
        return f"{','.join(targets)} (default for {kind})" if targets else "default"
    return targets if isinstance(targets, str) else ",".join(targets)
