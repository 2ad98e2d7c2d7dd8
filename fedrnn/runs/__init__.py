"""Step 5: a run's outputs: the run directory (rundir), files prepared before round 1 (prepare),
plots (plots).
"""
