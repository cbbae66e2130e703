"""The reference side: peft's layers built around torch bases, and the float64 oracle."""
