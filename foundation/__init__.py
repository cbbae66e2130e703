"""The case model (parameters, arrays, dtypes, quantized bases) and the error model (`Tracked`, the
comparison, the results' schema): what every other part of the suite is built on. Nothing here imports
another package of this project."""
