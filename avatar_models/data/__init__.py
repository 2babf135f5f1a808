"""Datasets: the procedural talking faces used by the bundled demo (``procedural_faces``)."""
