"""Training machinery: DeepSpeed set-up, optimisation recipe, loop and checkpoints. Knows no video."""
