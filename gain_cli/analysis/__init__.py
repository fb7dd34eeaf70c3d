"""Analyses of a finished run that need the model again (the paper's figures 1, 3 and 4).

Each one rebuilds the base model and the model after chosen stages from the run directory's saved
states (no retraining), evaluates on the run's own validation blocks, and writes a PNG + JSON.
"""
