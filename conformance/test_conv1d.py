"""Bases in transformers' ``Conv1D`` layout (GPT-2 style, weight (in, out)): peft with ``fan_in_fan_out``.

MLX has no such layout: the bridge gives the subject the transposed weight as an ``nn.Linear``, so
these checks hold peft's Conv1D handling and the bridge's transposes to the same oracle.
"""

from conformance import family_tests

globals().update(family_tests.module_tests("test_conv1d.py"))
