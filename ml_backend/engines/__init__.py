"""Engines that run the batches of `prelabel annotate` somewhere other than the calling process."""
