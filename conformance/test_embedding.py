"""LoRA on an ``nn.Embedding`` base: lookups, the tied output head and the merge agree with peft."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_embedding.py"))
