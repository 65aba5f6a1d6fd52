"""Training of learned components: the cSVR network (:mod:`.csvr`, ``slice2vol train-csvr``) on
simulated motion (:mod:`.csvr_data`).  Layer 5: uses core, io, simulation and methods."""
