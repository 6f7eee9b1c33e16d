"""Task streams for the trainer: the embedded synthetic suite and Hugging Face dataset adapters."""

from epi_jax.data.adapters import (
    DATASET_METRICS,
    DATASET_NAMES,
    DATASET_SKILLS,
    load_chats,
    load_examples,
)
from epi_jax.data.batching import ChatEncoder, Encoded, encode_chats, make_batch
from epi_jax.data.byte_tokenizer import ByteTokenizer
from epi_jax.data.chat_template import ChatTemplateEncoder
from epi_jax.data.examples import EvalExample
from epi_jax.data.iterator import BatchIterator, IteratorState
from epi_jax.data.records import DataError
from epi_jax.data.streams import (
    SKILLS,
    mixture_iterator,
    random_grouping,
    skill_grouping,
    stage_iterators,
)
from epi_jax.data.synthetic import (
    BASE_TASKS,
    TASK_METRICS,
    TASK_NAMES,
    TASK_SKILLS,
    VARIANT_TASKS,
    task_splits,
)
from epi_jax.data.turns import Turn

__all__ = [
    "DATASET_METRICS",
    "DATASET_NAMES",
    "DATASET_SKILLS",
    "SKILLS",
    "BASE_TASKS",
    "TASK_METRICS",
    "TASK_NAMES",
    "TASK_SKILLS",
    "VARIANT_TASKS",
    "BatchIterator",
    "ByteTokenizer",
    "ChatEncoder",
    "ChatTemplateEncoder",
    "DataError",
    "Encoded",
    "EvalExample",
    "IteratorState",
    "Turn",
    "encode_chats",
    "load_chats",
    "load_examples",
    "make_batch",
    "mixture_iterator",
    "random_grouping",
    "skill_grouping",
    "stage_iterators",
    "task_splits",
]
