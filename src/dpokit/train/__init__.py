"""Training: the one loop and the stage recipes that plug into it."""
