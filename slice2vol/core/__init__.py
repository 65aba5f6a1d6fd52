"""The mathematics every method shares, as pure tensor functions with shapes and units.

Layer 1 of slice2vol (imports only :mod:`slice2vol.errors` and each other, never upwards):

* :mod:`.geometry` -- the one world convention (RAS mm), slice-to-world poses, grids;
* :mod:`.transforms` -- rigid transforms (axis-angle, matrices, Kabsch);
* :mod:`.image` -- ``Stack``, ``SliceSet``, ``Volume`` (images always carry their affine);
* :mod:`.acquisition` -- the slice acquisition model (PSF, forward, adjoint);
* :mod:`.resample`, :mod:`.registration`, :mod:`.pose_search` -- resampling, the registration
  core and the global pose search;
* :mod:`.reconstruction`, :mod:`.robust` -- super-resolution solve and outlier weights;
* :mod:`.preprocess` -- stack registration, normalisation, the prepared problem;
* :mod:`.budget`, :mod:`.memory`, :mod:`.runtime` -- size checks, memory figures, devices/seeds.
"""
