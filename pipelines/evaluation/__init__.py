"""Evaluation of generators: a small shapes classifier whose features give a Fréchet distance (`sigma eval`)."""
