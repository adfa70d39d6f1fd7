"""A job for ``ordered_map`` whose negative input crashes its process, as a decoder's segfault does. A module of its
own, importing nothing heavy: every pool process the crash test spawns imports it."""

import os


def square_or_die(job: tuple[int, int]) -> tuple[int, object]:
    position, value = job
    if value < 0:
        os._exit(1)  # a decoder crash takes its whole worker process down
    return position, value * value
