"""The one error type a user should see."""


class Error(Exception):
    """A problem with the user's input, files or environment.

    Its message is one line naming the input and what is wrong with it; the
    tools print it alone, without a traceback.
    """
