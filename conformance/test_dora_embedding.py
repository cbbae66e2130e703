"""DoRA on an ``nn.Embedding`` base, as peft defines it: one magnitude per embedding dimension."""

from conformance import family_tests

globals().update(family_tests.module_tests("test_dora_embedding.py"))
