"""The pipeline: one module per DVC stage (see dvc.yaml), and the neutral modules they share."""
