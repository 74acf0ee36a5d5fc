"""How a student is built from its teacher.

Here: the student's shape and its initialisation from the teacher's weights (shape, width, bottleneck),
which teacher layer teaches which student layer (layer_maps), and the students that change shape while
they learn (theseus: module replacement; adashare: per-task layer policies). A new student shape goes here.
Not here: how a student trains (kdlib.training) or what it is trained on (kdlib.losses).
"""
