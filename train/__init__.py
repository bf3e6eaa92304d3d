"""Train stage: datasets, the two students, the collaborative trainer and evaluation."""
