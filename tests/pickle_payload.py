"""A pickle payload that proves whether a loader ran code from a checkpoint file."""


class CreatesFile:
    """Unpickling this creates `target`: if the file exists afterwards, code from the file ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))
