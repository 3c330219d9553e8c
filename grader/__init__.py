"""The BrewSLM Academy grading pipeline and the ``brewslm`` command (see ``cli.py``)."""
