"""Triton kernels (imported lazily by the ops in :mod:`facm_ext.ops`; importing this package imports nothing)."""
