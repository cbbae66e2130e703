"""Whole tiny models through the packages' own entry points: mlx-lm's loaders and fuse against transformers and peft."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_models.py"))
