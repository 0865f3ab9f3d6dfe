"""What training reports to its callers (the CLI turns each into a one-line message)."""


class TrainError(RuntimeError):
    pass


class DivergedError(TrainError):
    """The loss became non-finite: these settings do not train (a search prunes such a trial)."""


class ResumeRefused(TrainError):
    """An existing run folder cannot be continued (other training config or data, broken history):
    the caller may start a fresh folder instead (the train stage does)."""
