"""Quantization formats: one registry of everything vlq knows about each format, and what follows from
shapes alone (applicability).  Importing it costs no torch or ModelOpt: the CLI validates formats first.
"""
