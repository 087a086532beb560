"""The trainer's exit statuses that more than one of its modules reads (``consumers.trainer.command``'s docstring lists
every status and what it means). No imports: the command reads them without loading torch."""

EXIT_RANKS = 8  # a collective failed: another rank died or could not be reached (--world-size restarts the group)
EXIT_CHECKPOINT_FAILED = 9  # the last checkpoint could not be written (the previous one is intact)
EXIT_MODEL_DIVERGED = 10  # the weights are not finite: never checkpointed nor published
