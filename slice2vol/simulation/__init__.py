"""Simulated acquisitions with ground truth: motion models (:mod:`.motion`), the stack simulator
(:mod:`.simulate`) and the one atlas split into training / validation / test (:mod:`.splits`).
Layer 3: uses :mod:`slice2vol.core` and :mod:`slice2vol.io`."""
