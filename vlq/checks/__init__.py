"""The one result type of every guarantee vlq checks (check).
"""
