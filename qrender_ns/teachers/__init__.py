"""2D teachers: per-image masks with one 512-D embedding each, cached on disk for q-splat training.

`cache` holds the teacher-independent on-disk format (`TeacherCache`), `synthetic` a teacher built from a
generated scene's ground truth, `text` the text encoders that embed queries into the teacher's space, and
`extract` the `qsplat extract-features` command.
"""
