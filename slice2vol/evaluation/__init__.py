"""Measuring reconstructions: metrics and ``slice2vol evaluate`` (:mod:`.metrics`), the independent
rigid alignment for metrics (:mod:`.align`, SimpleITK), the reference-free quality verdict
(:mod:`.quality`) and ``slice2vol benchmark`` (:mod:`.benchmark`).  Layer 6: may use every layer
below (core, io, simulation, methods, training); nothing below imports it."""
