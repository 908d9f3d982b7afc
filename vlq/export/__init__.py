"""Writing the checkpoint (export), reading it back from its files alone (inspect), and the independent
dequantizer that rebuilds the model from those files (dequant).
"""
