"""Models and data: loading a Qwen2.5-VL (models), the tiny model's builders and training, calibration
batches and held-out rows.  The shipped files (corpora, configs, the tiny-trained checkpoint) live here too.
"""
