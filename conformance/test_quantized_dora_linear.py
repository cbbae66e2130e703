"""DoRA on a quantized Linear base, in every quantization mode and bit width the installed MLX offers.

peft is given the dequantized weight: that is what the quantized base computes with. Each mode is
its own parametrization (affine twice: bit widths whose values fit a 32-bit word whole, and 3, 5
and 6 bits, which straddle words), with a tenth of the profile's examples (the bit widths and group
sizes are drawn): DoRA's arithmetic is that of `test_dora_linear.py`, and what is new here
(dequantizing, re-quantizing, sizing the adapter) shows on any case.
"""

from conformance import family_tests

globals().update(family_tests.module_tests("test_quantized_dora_linear.py"))
