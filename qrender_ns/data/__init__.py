"""Datasets for q-splat: a deterministic procedural indoor scene generator (see `scene_generator`)."""
