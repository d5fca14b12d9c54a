"""Samplers built from adapter steps (combined generation, AIG, ...)."""

from .combined import aig_base_weights, aig_sample, combined_sample

__all__ = ["aig_base_weights", "aig_sample", "combined_sample"]
