"""Human-readable output: tables and plots of decisions, checks, fidelity and benchmarks (tables), and
``vlq explain`` (explain).
"""
