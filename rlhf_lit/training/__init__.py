"""The Lightning layer: the stage modules' base, callbacks, checkpoint IO, optimizers, strategies, output paths."""
