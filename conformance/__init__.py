"""Numerical conformance suite for MLX LoRA layers: run it with ``pytest conformance``."""
