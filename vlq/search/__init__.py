"""The LM-only AutoQuant search: the scheme it is asked to run, the search itself and its guards, the saved
search state, the memory plan and the placement over GPUs.
"""
