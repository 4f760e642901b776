"""emomerge.merging — the core: adapters → task vectors → methods → writers.

Works on tensors and safetensors files only (no transformers import), so it is fast to import.
"""

from .adapters import LoraAdapter, load_adapter
from .engine import MergeResult, get_method, merge, resolve_params
from .errors import InputError, MergeInputError
from .methods import MergeMethod
from .registry import METHODS
from .taskvectors import TaskVectors, build_task_vectors

__all__ = [
    "METHODS",
    "InputError",
    "LoraAdapter",
    "MergeInputError",
    "MergeMethod",
    "MergeResult",
    "TaskVectors",
    "build_task_vectors",
    "get_method",
    "load_adapter",
    "merge",
    "resolve_params",
]
