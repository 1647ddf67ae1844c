"""The error every config/plan check raises (one line per problem, all reported at once), and the
exit codes of the launcher and of a rank, named once."""

# A rank's (and the launcher's) exit codes. 0: done, or preempted and checkpointed (to resume); 1: a
# crash (an in-job restart, dist.max_restarts, may help).
EXIT_USER_ERROR = 2  # a problem with the config or data: reported before any work; retrying cannot help
EXIT_NONFINITE = 3  # stopped after train.max_nonfinite_steps non-finite steps in a row (checkpointed)
EXIT_HUNG = 4  # a step outlived dist.step_timeout_s (a restart from the latest checkpoint may help)
EXIT_CHECKPOINT_WRITE = 5  # a checkpoint could not be written (disk full, read-only); the previous one stands
# The codes a retry cannot cure: the batch script ends the job with them instead of restarting the
# ranks (trainer/node.py reports them).
NOT_RETRIED = {EXIT_USER_ERROR: "a problem with the config or data",
               EXIT_NONFINITE: "non-finite steps in a row, train.on_nonfinite=stop",
               EXIT_CHECKPOINT_WRITE: "a checkpoint could not be written"}


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        head = f"{len(problems)} problem(s) in {source}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))
