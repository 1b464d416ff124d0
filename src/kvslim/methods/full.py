"""The uncompressed baseline: every token is kept, exactly as a Hugging Face DynamicCache would."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method
from .registry import register


@register
@dataclass
class Full(Method):
    """Keep everything; the reference every other method is measured against."""

    name = "full"
    summary = "no compression (baseline)"
    paper = "-"
