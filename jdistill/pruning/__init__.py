"""Structured pruning: importance scores -> masks for a target -> a smaller dense model."""

from jdistill.pruning.importance import (activation_scores, compute_scores, layer_skip_scores,
                                         magnitude_scores, taylor_scores)
from jdistill.pruning.masks import (Dims, check_dims, contiguous_block_mask, dims_for_ratio,
                                    dims_within, select_masks)
from jdistill.pruning.schedule import compression_schedule, iterative_prune
from jdistill.pruning.slicing import kept_indices, slice_model, sliced_dims

__all__ = ["Dims", "activation_scores", "check_dims", "compression_schedule", "compute_scores",
           "contiguous_block_mask", "dims_for_ratio", "dims_within", "iterative_prune",
           "kept_indices", "layer_skip_scores", "magnitude_scores", "select_masks", "slice_model",
           "sliced_dims", "taylor_scores"]
