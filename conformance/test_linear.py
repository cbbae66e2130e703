"""LoRA on an ``nn.Linear`` base: the subject computes, and merges to, what peft and the formula do."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_linear.py"))
