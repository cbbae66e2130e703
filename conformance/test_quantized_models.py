"""Whole tiny models whose MLX copy is quantized: QLoRA through mlx-lm's loaders, its training path and ``fuse`` (with
and without ``--dequantize``) against peft on the values the quantized weights hold."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_quantized_models.py"))
