"""Data sets: procedural ``shapes`` renders, scikit-learn ``digits``, and image folders."""
