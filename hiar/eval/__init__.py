"""Evaluation maths: the drift suite and VBench-style dynamics, and the promotion gate (pure functions).
"""
