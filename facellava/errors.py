"""The one exception type for errors a user can cause and fix."""


class FaceLlavaError(Exception):
    """A problem with the user's input (a path, a checkpoint, a bundle, an argument).

    Its message is one line that says what is wrong and what to do; the CLI prints it without a traceback and
    exits non-zero. Bugs raise ordinary exceptions instead.
    """
