"""The reference side: peft layers, the float64 oracle and the bridge to MLX conventions."""
