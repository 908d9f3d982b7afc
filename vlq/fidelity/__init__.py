"""How far a quantized model sits from BF16 (metrics, llama.cpp-style KLD), and comparisons of two
searches' decisions and fidelity (comparison).
"""
