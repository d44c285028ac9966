"""The tiny world: a synthetic captioned video domain and its analytic oracle.
"""
