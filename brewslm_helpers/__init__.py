"""Plumbing shared by the BrewSLM Academy notebooks: models, data, evaluation, timing, plots.

It never holds the answer to a graded exercise: each lesson's exercises are written in its notebook.
"""
__version__ = "0.1.0"
