"""The `qsplat` verbs that span layers (demo, datasets, teachers, queries, GS-Net training): options in options.py, one
code module per verb."""
