"""DoRA on an ``nn.Linear`` base: the magnitude, the detached weight norm and the merge agree with peft."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_dora_linear.py"))
