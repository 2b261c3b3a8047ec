"""The training loop: pre-training (Alg. 1) and SFT (Alg. 2) of a LLaDA mask predictor.

One :class:`Trainer` serves both objectives, on one device or under ``torchrun`` (DDP or FSDP2).
Per optimizer step it takes ``global_batch = world_size * grad_accum * micro_batch`` sequences
from a deterministic :class:`~llada_ext.training.data.DataStream`, masks them with noise keyed
by each sequence's stream position, accumulates gradients, clips them and steps AdamW under a
warmup-stable-decay schedule.

Output folder layout::

    <out>/config.json, model.safetensors   latest weights (``LLaDAModel.from_pretrained(out)``)
    <out>/checkpoints/step-XXXXXXXX.pt     resumable checkpoints (newest ``keep_last`` kept)
    <out>/checkpoints/step-XXXXXXXX.dcp/   the same for FSDP2 runs, one shard per rank
    <out>/metrics.jsonl                    one line per step: loss, lr, grad norm, tokens/s
    <out>/train_config.json                the run's settings
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..generation_config import GENERATION_CONFIG_NAME, fitting, write_generation_config
from ..model import config_token_id
from .checkpoint import (
    TOKENIZER_FILES,
    CheckpointManager,
    capture_rng_state,
    remove_interrupted_saves,
    resolve_checkpoint,
    restore_rng_state,
)
from .data import DataStream, SequenceDataset
from .dcp import save_dcp_checkpoint
from .distributed import (
    DistInfo,
    all_reduce_max_flag,
    all_reduce_mean,
    barrier,
    full_model_state_dict,
    full_state_dicts,
    gather_objects,
    resolve_device,
    split_global_batch,
    wrap_for_training,
)
from .losses import (
    MaskedBatch,
    MaskedLMObjective,
    build_pretrain_batch,
    build_sft_batch,
    cut_length,
    keyed_generator,
    keyed_noise,
)
from .order import Batch
from .progress import RunLog, StopRequest
from .resume import check_same_path, load_training_state, restore_schedule
from .schedule import make_wsd_scheduler
from .train_config import TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "param_groups"]

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices, none on norms and embeddings.

    Parameters
    ----------
    model : nn.Module
        The LLaDA model.
    weight_decay : float
        Decay of the first group.

    Returns
    -------
    list of dict
        ``[{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0}]``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D parameters are the RMSNorm scales; the token embedding is a lookup table whose
        # rare rows would otherwise be pulled to zero between their updates.
        if p.dim() < 2 or name.endswith("wte.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _checked_config(config: TrainConfig, dataset: SequenceDataset) -> TrainConfig:
    """A validated copy of ``config`` (the trainer fills in ``global_batch`` / ``grad_accum``)."""
    config.validate()
    config = dataclasses.replace(config)
    if config.objective == "sft" and not dataset.is_sft:
        raise ValueError("objective 'sft' needs a dataset with prompt lengths")
    if config.objective == "pretrain" and dataset.is_sft:
        raise ValueError("objective 'pretrain' needs a packed pre-training dataset")
    return config


class Trainer:
    """Trains a :class:`llada_ext.LLaDAModel` on a :class:`SequenceDataset`.

    Parameters
    ----------
    model : nn.Module
        The model (moved to the training device; its ``backend`` decides kernels vs torch).
    dataset : SequenceDataset
        Packed pre-training sequences, or SFT rows with prompt lengths.
    config : TrainConfig
        Run settings.
    dist_info : DistInfo, optional
        From :func:`~llada_ext.training.distributed.init_distributed`; single process on
        ``device`` when None.
    device : str or torch.device, optional
        Device when ``dist_info`` is None ("auto" picks CUDA when available).
    tokenizer_folder : str, optional
        Folder whose ``tokenizer.json`` files are copied into the output folder, so the saved
        model loads with its tokenizer.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: SequenceDataset,
        config: TrainConfig,
        *,
        dist_info: DistInfo | None = None,
        device: str | torch.device | None = None,
        tokenizer_folder: str | os.PathLike | None = None,
    ) -> None:
        config = _checked_config(config, dataset)
        self.config = config
        self.info = dist_info if dist_info is not None else DistInfo(device=resolve_device(device))
        self.device = self.info.device
        self._global_batch_given = config.global_batch is not None
        gb = (
            config.global_batch
            or config.micro_batch_size * config.grad_accum * self.info.world_size
        )
        config.grad_accum = split_global_batch(gb, config.micro_batch_size, self.info.world_size)
        config.global_batch = gb
        self.dataset = dataset
        self.tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder else None
        self.out_dir = Path(config.out_dir)
        self._setup_model(model)
        self._setup_optimizer()
        self.stream = DataStream(dataset, seed=config.seed, shuffle=config.shuffle)
        if self.info.is_main:
            remove_interrupted_saves(self.out_dir)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", keep_last=config.keep_last)
        self.step = 0
        self.last_lr = float(config.lr)
        self.last_checkpoint: Path | None = None

    def _setup_model(self, model: nn.Module) -> None:
        """The model on the training device, its objective, precision and parallel wrapper."""
        config = self.config
        self.model = model.to(self.device)
        self.model.train()
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing = True
        self.mask_id = config_token_id(
            self.model.config, "mask_token_id", None, "mask_id", "training"
        )
        self.bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        self.objective = MaskedLMObjective(self.model)
        self.wrapped = wrap_for_training(
            self.objective, self.model, self.info, fsdp=config.fsdp, bf16=self.bf16
        )
        # FSDP has its own mixed precision; everywhere else bf16 means autocast.
        self.use_autocast = self.bf16 and not config.fsdp

    def _setup_optimizer(self) -> None:
        """AdamW over :func:`param_groups` under the warmup-stable-decay schedule."""
        config = self.config
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.adam_eps,
        )
        self.scheduler = make_wsd_scheduler(
            self.optimizer,
            total_steps=config.steps,
            warmup_steps=min(config.warmup_steps, config.steps),
            decay_steps=round(config.decay_frac * config.steps),
            min_ratio=config.min_lr_ratio,
            shape=config.decay_shape,
        )

    # ---------------------------------------------------------------------------------------
    @property
    def sequences_per_step(self) -> int:
        """Sequences consumed by one optimizer step over all ranks (the global batch)."""
        c = self.config
        return c.micro_batch_size * c.grad_accum * self.info.world_size

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _masked_batch(self, b: Batch, length: int) -> MaskedBatch:
        """The forward process of the objective applied to micro-batch ``b`` cut to ``length``."""
        c = self.config
        ids = b.input_ids[:, :length].to(self.device, non_blocking=True)
        # Noise for the full length, then cut: a sequence's mask prefix does not depend
        # on whether the batch was cut.
        noise = keyed_noise(b.keys, self.dataset.seq_len, seed=c.seed).narrow(length)
        if c.objective == "pretrain":
            return build_pretrain_batch(ids, mask_id=self.mask_id, noise=noise, eps=c.mask_eps)
        assert b.prompt_lengths is not None
        return build_sft_batch(
            ids, b.prompt_lengths, mask_id=self.mask_id, noise=noise, eps=c.mask_eps
        )

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss averaged over ranks, grad norm, tokens)."""
        c = self.config
        batches = self.stream.step_batches(
            micro_batch=c.micro_batch_size,
            grad_accum=c.grad_accum,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        L = self.dataset.seq_len
        if c.objective == "pretrain":
            # Decided per step from (seed, step): every rank and micro-batch cut alike.
            length = cut_length(
                L, prob=c.random_length_prob, generator=keyed_generator(c.seed, 0x637574, self.step)
            )
        else:
            length = L
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = 0
        for i, b in enumerate(batches):
            mb = self._masked_batch(b, length)
            weights = mb.weights / c.grad_accum
            sync = (
                self.wrapped.no_sync()
                if hasattr(self.wrapped, "no_sync") and i < len(batches) - 1
                else contextlib.nullcontext()
            )
            with sync:
                with self._autocast():
                    loss = self.wrapped(mb.noisy, mb.targets, weights)
                loss.backward()
            total += loss.detach().float()
            tokens += mb.targets.numel()
        if c.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])  # the lr of this step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stream.advance(self.sequences_per_step)
        self.step += 1
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        loss_all = all_reduce_mean(total)
        return float(loss_all.item()), float(gnorm.item()), tokens * self.info.world_size

    # ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``config.steps`` optimizer steps are done (or Ctrl-C / SIGTERM).

        Returns
        -------
        TrainResult
        """
        result = TrainResult(step=self.step)
        log = self._open_log()
        stop = StopRequest()
        t_start = time.perf_counter()
        try:
            with stop.installed():
                self._run_steps(result, stop, log)
        except KeyboardInterrupt:
            # A Ctrl-C outside the step (e.g. while logging): the state is consistent.
            result.interrupted = True
        finally:
            log.close()
        elapsed = max(time.perf_counter() - t_start, 1e-9)
        result.tokens_per_second = log.tokens / elapsed
        # After a hard interrupt under torchrun a collective may be half done and saving
        # (itself collective) could hang, so only then is the checkpoint skipped.
        nothing_new = not result.losses and self.last_checkpoint is not None
        if not nothing_new and not (
            result.interrupted and self.info.is_distributed and not stop.requested
        ):
            self.save_checkpoint()
        result.step = self.step
        result.checkpoint = self.last_checkpoint
        if result.interrupted and self.info.is_main:
            logger.warning(
                "Interrupted at step %d; checkpoint saved to %s. Run again with --resume to "
                "continue.",
                self.step,
                self.last_checkpoint,
            )
        return result

    def _open_log(self) -> RunLog:
        """Rank 0 writes ``train_config.json`` and gets the bar and ``metrics.jsonl``."""
        main = self.info.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(
                json.dumps(self.config.to_dict(), indent=2) + "\n"
            )
        return RunLog(
            self.out_dir / "metrics.jsonl" if main else None,
            total=self.config.steps,
            initial=self.step,
            progress=self.config.progress and main,
        )

    def _run_steps(self, result: TrainResult, stop: StopRequest, log: RunLog) -> None:
        """Optimizer steps until ``config.steps`` or a stop request; fills ``result``."""
        c = self.config
        while self.step < c.steps:
            snapshot = capture_rng_state()
            t0 = time.perf_counter()
            try:
                loss, gnorm, tokens = self._train_step()
            except KeyboardInterrupt:
                # Parameters change only in optimizer.step(), the data position and the step
                # counter only after it: roll back the gradients and RNG and the state is that
                # of the last completed step.
                self.optimizer.zero_grad(set_to_none=True)
                restore_rng_state(snapshot)
                result.interrupted = True
                return
            dt = max(time.perf_counter() - t0, 1e-9)
            result.losses.append(loss)
            log.record(
                step=self.step,
                loss=loss,
                lr=self.last_lr,
                grad_norm=gnorm,
                tokens=tokens,
                seconds=dt,
                epoch=self.stream.epoch,
            )
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                # FSDP2: the periodic saves stay sharded; the full weights are gathered for
                # <out>/model.safetensors only at the end (or with `export`)
                self.save_checkpoint(weights=not c.fsdp)
            if all_reduce_max_flag(stop.requested, self.device):
                result.interrupted = True
                return

    # ---------------------------------------------------------------------------------------
    def save_checkpoint(self, weights: bool = True) -> Path | None:
        """Write a checkpoint of the current step and (``weights``) the model weights.

        Every rank must call this. Single process and DDP: rank 0 writes one file. FSDP2:
        every rank writes its shards into one ``.dcp`` folder (:mod:`.dcp`); the full weights
        for ``<out>/model.safetensors`` are gathered collectively unless ``weights`` is False
        (the periodic saves of an FSDP2 run: ``llada-ext export`` makes a model folder from
        any checkpoint).

        Returns
        -------
        Path or None
            The checkpoint: on rank 0, and with FSDP2 on every rank; None elsewhere.
        """
        trainer_state = {
            "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(),
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
        }
        if self.config.fsdp:
            path = save_dcp_checkpoint(
                self.ckpt.directory,
                self.step,
                self.model,
                self.optimizer,
                trainer_state,
                capture_rng_state(),
            )
            self.last_checkpoint = path
            # gathering the full weights puts a copy of every parameter on rank 0 (32 GB for
            # 8B in float32): only the final save writes <out>/model.safetensors
            msd = full_model_state_dict(self.model, fsdp=True) if weights else None
            if self.info.is_main:
                self.ckpt.prune()
                if msd is not None:
                    self._save_pretrained(msd)
            barrier()
            return path
        msd, osd = full_state_dicts(self.model, self.optimizer, fsdp=False)
        rng = gather_objects(capture_rng_state())
        path = None
        if self.info.is_main:
            state = {"model": msd, "optimizer": osd, "rng": rng, **trainer_state}
            path = self.ckpt.save(self.step, {**state, "world_size": self.info.world_size})
            self._save_pretrained(msd)
            self.last_checkpoint = path
        barrier()
        return path

    def _save_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        # Rebuild a CPU model around the gathered tensors: works the same for replicated and
        # FSDP-sharded training, and never copies weights on the training device.
        cls = type(self.model)
        with torch.device("meta"):
            cpu_model = cls(self.model.config, backend="torch")
        cpu_model.load_state_dict(state, strict=True, assign=True)
        cpu_model.save_pretrained(self.out_dir)
        if not (self.out_dir / GENERATION_CONFIG_NAME).exists():
            # sampling settings that fit the rows this model was trained on
            write_generation_config(self.out_dir, fitting(self.dataset.seq_len), self.model.config)
        if self.tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                src = self.tokenizer_folder / name
                if src.is_file() and src.resolve() != (self.out_dir / name).resolve():
                    shutil.copyfile(src, self.out_dir / name)

    def find_checkpoint(self, resume: str | os.PathLike) -> Path | None:
        """Resolve ``resume``: "auto" (newest in this run's folder, None if there is none),
        a checkpoint file or ``.dcp`` folder, a run folder or a checkpoints folder.

        Raises
        ------
        FileNotFoundError
            If an explicit path holds no checkpoint.
        """
        if str(resume) == "auto":
            return self.ckpt.latest()
        return resolve_checkpoint(resume)

    def resume(self, resume: str | os.PathLike) -> bool:
        """Load a checkpoint so that training continues exactly where it stopped.

        Either checkpoint format loads into a run of any kind and world size (see
        :mod:`.resume`); the global batch of the checkpoint is kept unless this run's config
        sets ``global_batch`` explicitly. Every rank must call this.

        Parameters
        ----------
        resume : str or path-like
            See :meth:`find_checkpoint`.

        Returns
        -------
        bool
            False when ``resume == "auto"`` and there is no checkpoint yet.
        """
        path = self.find_checkpoint(resume)
        check_same_path(path)
        if path is None:
            return False
        meta, rng = load_training_state(
            path,
            self.model,
            self.optimizer,
            self.config,
            self.info,
            global_batch_given=self._global_batch_given,
        )
        restore_schedule(
            self.scheduler, self.optimizer, self.config.lr, int(meta["scheduler"]["last_epoch"])
        )
        self.stream.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        restore_rng_state(rng)
        self.last_checkpoint = path
        return True
