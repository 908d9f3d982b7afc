"""vLLM: the in-process engine runner and per-layer resolution without kernels (runner), and the checks a
served checkpoint must pass (checks).
"""
