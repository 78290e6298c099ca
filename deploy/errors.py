"""The deploy room's error: a repository that cannot be written as asked."""

from pcee.runtime import PceeError


class DeployError(PceeError, ValueError):
    """Options or a target directory that a Triton model repository cannot be written from or into."""
