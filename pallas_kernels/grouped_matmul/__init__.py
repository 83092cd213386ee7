"""Grouped matmul for Mixture-of-Experts: rows sorted by group, each group times its own weight."""
from pallas_kernels.grouped_matmul.api import GroupedBlocks, grouped_matmul

__all__ = ["GroupedBlocks", "grouped_matmul"]
