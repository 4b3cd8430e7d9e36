"""Plain-Python twins of the Cython kernels in ``qmigx._core``.

Each module here has the same public functions and classes as its
compiled twin and the same results for every input. They are the test
oracle: property tests check that both agree. They are slow by design:
clarity over speed.
"""
