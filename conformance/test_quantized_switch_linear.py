"""LoRA on a quantized mixture-of-experts base (``QuantizedSwitchLinear``), in every mode the installed
MLX offers: peft is given the dequantized experts' weights.

A tenth of the profile's examples per mode: the LoRA arithmetic is that of the dense switch base
(`test_switch_linear.py`); what is new here (dequantizing, re-quantizing, the merged dtype) shows on
any case.
"""

from conformance import family_tests

globals().update(family_tests.module_tests("test_quantized_switch_linear.py"))
