"""LoRA on a mixture-of-experts base (``SwitchLinear``): each token's k experts, routed sorted or not.

peft adapts expert weights through ``target_parameters``; where it refuses a case (dropout > 0) the
reference is one peft ``Linear`` per expert (see `reference.peft_layers.switch`). Half the profile's
examples: each expert's arithmetic is a Linear layer's (`test_linear.py`); routing bugs show in any
case with two experts or more.
"""

from conformance import family_tests

globals().update(family_tests.module_tests("test_switch_linear.py"))
