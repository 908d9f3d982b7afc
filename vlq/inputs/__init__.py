"""What a run is asked to work on, checked before anything heavy loads: model and data requests, the run
folder's file names (requests), and what a checkpoint folder must hold for each stage (prerequisites).
"""
