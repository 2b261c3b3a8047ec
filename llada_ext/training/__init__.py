"""Training of LLaDA mask predictors: objectives, data, schedule, checkpoints, the loop.

The pieces most users need::

    from llada_ext.training import TrainConfig, Trainer, build_pretrain_dataset

See :mod:`llada_ext.training.trainer` for the output folder layout and
:mod:`llada_ext.training.losses` for the exact objectives (Alg. 1 and Alg. 2 of the paper).
"""

from .checkpoint import CheckpointManager, atomic_save, load_checkpoint
from .data import (
    DataError,
    DataStream,
    SequenceDataset,
    build_pretrain_dataset,
    build_sft_dataset,
    load_hf_records,
    read_records,
    records_to_pairs,
    records_to_texts,
)
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .losses import (
    EPS,
    MaskedLMObjective,
    MaskNoise,
    build_pretrain_batch,
    build_sft_batch,
    draw_noise,
    masked_token_loss,
    pretrain_loss,
    sft_loss,
)
from .prepare import prepare_shards
from .schedule import make_wsd_scheduler, wsd_factor
from .shards import ShardDataset
from .train_config import TrainConfig, TrainResult
from .trainer import Trainer

__all__ = [
    "EPS",
    "CheckpointManager",
    "DataError",
    "DataStream",
    "DistInfo",
    "MaskNoise",
    "MaskedLMObjective",
    "SequenceDataset",
    "ShardDataset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "atomic_save",
    "build_pretrain_batch",
    "build_pretrain_dataset",
    "build_sft_batch",
    "build_sft_dataset",
    "cleanup_distributed",
    "draw_noise",
    "init_distributed",
    "load_checkpoint",
    "load_hf_records",
    "make_wsd_scheduler",
    "masked_token_loss",
    "prepare_shards",
    "pretrain_loss",
    "read_records",
    "records_to_pairs",
    "records_to_texts",
    "sft_loss",
    "wsd_factor",
]
