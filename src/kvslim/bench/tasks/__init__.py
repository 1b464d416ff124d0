"""Long-context evaluation tasks, generated reproducibly from a seed and sized in tokens.

``get_task("needle").generate(n, length, tokenizer, seed)`` gives :class:`Sample` s; ``task.score``
grades an output. Importing this package imports every task module, which registers it.
"""
from . import fwe, longgen, multikey, multivalue, needle, passkey, perplexity, vt  # noqa: F401  (registration)
from .base import Sample, Task, get_task, list_tasks, register

__all__ = ["Sample", "Task", "get_task", "list_tasks", "register"]
