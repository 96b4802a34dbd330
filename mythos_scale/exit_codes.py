"""The exit statuses of every ``mythos`` command (and of each training rank).

Imports nothing: a command's ``--help`` and its handlers load before torch does."""

EXIT_OK = 0
EXIT_FAILED = 1  # training could not go on (non-finite losses, a checkpoint that cannot be written)
EXIT_BAD_INPUT = 2  # a config, path, dataset, checkpoint or option that cannot be used; nothing lost
EXIT_PREEMPTED = 75  # stopped on a signal after saving what the grace time allowed: run again to resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C: ended without saving
