"""The subject side: which MLX layers are under test (`known`) and how each is built, loaded, called and
merged (`bridge`), and what MLX's own kernels compute where the oracle needs it (`kernels`)."""
