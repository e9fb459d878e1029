"""Small helpers shared by every layer (no q-splat imports): version checks, crash-safe writes, progress bars,
process start-up settings, rotations."""
