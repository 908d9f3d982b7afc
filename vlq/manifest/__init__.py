"""What a search decided, as JSON (manifest), and a sweep's decisions per target (sweep).
"""
