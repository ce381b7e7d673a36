"""agent workers: one process per agent kind, running the model call for each step."""
