"""distar: Diff-Instruct* post-training of one-step text-to-image generators."""

__version__ = "0.1.0"
