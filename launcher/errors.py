"""The error every config/plan check raises: one line per problem, all reported at once."""


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        head = f"{len(problems)} problem(s) in {source}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))
